"""The one error ``wstally logs`` reports to its user rather than raises."""

from __future__ import annotations

__all__ = ["LogsError"]


class LogsError(Exception):
    """A bad option value; the message is meant for the user."""
