"""Times in ``wstally logs``: the ``--since``/``--until`` bounds and the log's timestamps.

Both become one form, the one structlog's TimeStamper writes (UTC, microseconds), so that
a bound and a timestamp compare as plain strings, with no datetime per line.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from wstally.logs.errors import LogsError

__all__ = ["iso", "normal_ts", "parse_time"]

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def iso(moment: datetime) -> str:
    """``moment`` in the log's own timestamp form."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str, now: datetime | None = None) -> str:
    """``10m``, ``2h``, ``1h30m``, ``30s``, ``1d`` ago, or an ISO time (local unless it says).

    Returns the bound as an ISO string in the form of the log's timestamps.
    """
    text = text.strip()
    now = now if now is not None else datetime.now(UTC)
    if text and _RELATIVE.sub("", text) == "":
        seconds = sum(float(n) * _UNITS[unit] for n, unit in _RELATIVE.findall(text))
        return iso(now - timedelta(seconds=seconds))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise LogsError(
            f"not a time: {text!r}; use an ISO time (2026-11-24T10:00, add Z for UTC) "
            "or a duration ago (30s, 10m, 2h, 1d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # what a person at this terminal means
    return iso(moment)


def normal_ts(ts: Any) -> str | None:
    """A log timestamp in the comparable form (isoformat drops a zero microsecond)."""
    if not isinstance(ts, str):
        return None
    if len(ts) == 27 and ts[-1] == "Z":
        return ts
    if len(ts) == 20 and ts[-1] == "Z":
        return ts[:19] + ".000000Z"
    try:
        moment = datetime.fromisoformat(ts)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return iso(moment)
