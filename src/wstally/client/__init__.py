"""Terminal clients: ``wstally client`` (interactive or piped) and ``wstally watch``."""
