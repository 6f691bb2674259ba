"""wstally: a broadcast-style multi-client tally service over WebSockets."""

__all__ = ["__version__"]

__version__ = "0.1.0"
