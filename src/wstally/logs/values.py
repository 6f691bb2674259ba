"""What a log line's values mean, whatever JSON put there: levels, text, numbers, keys.

Lines come from files anyone may have edited: every reading here accepts any JSON value
and never raises.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["LEVELS", "as_int", "as_key", "as_number", "as_text"]

LEVELS = {
    "debug": 10,
    "info": 20,
    "warning": 30,
    "warn": 30,
    "error": 40,
    "exception": 40,
    "critical": 50,
}


def as_text(value: Any) -> str:
    """A string as itself, anything else as compact JSON (``--where code=1006``)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def as_number(value: Any) -> float | None:
    """A finite number, from a number or a numeric string; None for anything else."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def as_int(value: Any) -> int:
    """A count from a log line; 0 for anything that is not a finite number."""
    if type(value) is int:
        return value
    number = as_number(value)
    return 0 if number is None else int(number)


def as_key(value: Any) -> Any:
    """``value`` as a dict key: what JSON gives may be a list or an object."""
    return value if value is None or isinstance(value, str | int | float) else as_text(value)
