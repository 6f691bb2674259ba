"""One log event as one readable line, colored on a terminal, its exception underneath.

Every value is escaped on the way out: a log's values come from peers (names, inputs, close
reasons), and a log file may have been written by anyone.
"""

from __future__ import annotations

import json
import re
from typing import Any

from wstally.logs.when import normal_ts
from wstally.text import escape_text

__all__ = ["format_event", "short_ts"]

# Fields shown first, in this order, in the pretty output.
CONTEXT = ("conn", "client", "name", "peer", "mode")
_HIDDEN = frozenset(("timestamp", "level", "event", "logger", "exception", *CONTEXT))

_COLORS = {
    "debug": "\x1b[2m",
    "info": "\x1b[32m",
    "warning": "\x1b[33m",
    "warn": "\x1b[33m",
    "error": "\x1b[31m",
    "exception": "\x1b[31m",
    "critical": "\x1b[1;31m",
}
_RESET = "\x1b[0m"
_BOLD = "\x1b[1m"
_DIM = "\x1b[2m"
_SIMPLE = re.compile(r"[^\s\"'=\\]+")


def _value(value: Any) -> str:
    if isinstance(value, str):
        if _SIMPLE.fullmatch(value):
            return escape_text(value, limit=None)
        # Quoted as is: the server already escaped what a peer sent (\x1b stays readable).
        return '"' + escape_text(value, limit=None).replace('"', '\\"') + '"'
    return escape_text(json.dumps(value, ensure_ascii=False, separators=(",", ":")), limit=None)


def short_ts(ts: Any) -> str:
    """A timestamp as ``2026-11-24 10:00:01.000Z``, to the millisecond."""
    normal = normal_ts(ts)
    if normal is not None:
        return f"{normal[:10]} {normal[11:23]}Z"
    return escape_text(str(ts), limit=None) if ts is not None else "-"


def _fields(event: dict[str, Any]) -> list[str]:
    """``key=value`` for what the line shows after its name: the context first."""
    parts: list[str] = []
    logger = event.get("logger")
    if isinstance(logger, str) and not logger.startswith("wstally"):
        parts.append(f"logger={escape_text(logger, limit=None)}")
    for key in CONTEXT:
        if key in event and event[key] is not None:
            parts.append(f"{key}={_value(event[key])}")
    for key, value in event.items():
        if key not in _HIDDEN:
            parts.append(f"{escape_text(key, limit=None)}={_value(value)}")
    return parts


def format_event(event: dict[str, Any], color: bool) -> str:
    """One event as one readable line (plus its exception, if any)."""
    level = str(event.get("level", "-"))
    name = escape_text(str(event.get("event", "-")), limit=None)
    parts = _fields(event)
    ts = short_ts(event.get("timestamp"))
    if color:
        tint = _COLORS.get(level, "")
        fields = " ".join(f"{_DIM}{k}={_RESET}{v}" for k, _, v in (p.partition("=") for p in parts))
        line = f"{_DIM}{ts}{_RESET} {tint}{level:<8}{_RESET} {_BOLD}{name:<20}{_RESET} {fields}"
    else:
        line = f"{ts} {level:<8} {name:<20} {' '.join(parts)}"
    line = line.rstrip()
    exc = event.get("exception")
    if exc:
        line += "\n" + _format_exception(exc)
    return line


def _format_exception(exc: Any) -> str:
    if isinstance(exc, str):
        return "\n".join("    " + escape_text(line, limit=None) for line in exc.splitlines())
    lines: list[str] = []
    if isinstance(exc, list):
        for item in exc:
            if isinstance(item, dict):
                lines += _format_exception_item(item)
    return "\n".join(lines) if lines else "    " + _value(exc)


def _format_exception_item(item: dict[str, Any]) -> list[str]:
    """One exception of a chain, from structlog's dict_tracebacks: where, then what."""
    lines: list[str] = []
    frames = item.get("frames")
    if isinstance(frames, list) and frames and isinstance(frames[-1], dict):
        f = frames[-1]
        where = f"{f.get('filename')}:{f.get('lineno')} in {f.get('name')}"
        lines.append(f"    at {escape_text(where, limit=None)}")
    exc_type = escape_text(str(item.get("exc_type")), limit=None)
    lines.append(f"    {exc_type}: {escape_text(str(item.get('exc_value')), limit=None)}")
    return lines
