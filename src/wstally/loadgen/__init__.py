"""Load generation for wstally: cheap watchers, pipelined or paced senders, a verdict."""
