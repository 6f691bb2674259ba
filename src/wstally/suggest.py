"""A misspelt flag answered with the flag it most likely meant.

argparse in Python 3.11 only says ``unrecognized arguments: --wathcers 5``; 3.14's
``suggest_on_error`` covers sub-command and choice names, not flags. This does it for
flags, with the same closeness test as difflib's ``get_close_matches``.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Sequence

__all__ = ["closest_flag", "parse_args"]


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with a suggestion for each unknown flag (exit 2)."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        parser.error(_unrecognized(extras, parser._option_string_actions))
    return args


def closest_flag(given: str, known: Iterable[str]) -> str | None:
    """The known flag ``given`` most likely misspells (``--x=1`` is read as ``--x``)."""
    if not given.startswith("-"):
        return None  # a value, or a stray word: nothing to suggest
    flag = given.partition("=")[0]
    long_flags = [k for k in known if k.startswith("--")]
    matches = difflib.get_close_matches(flag, long_flags, n=1)
    return matches[0] if matches else None


def _unrecognized(extras: list[str], known: Iterable[str]) -> str:
    message = f"unrecognized arguments: {' '.join(extras)}"
    flags = list(known)
    hints = [
        (given.partition("=")[0], hint) for given in extras if (hint := closest_flag(given, flags))
    ]
    if len(hints) == 1:
        return f"{message}; did you mean {hints[0][1]}?"
    if hints:
        return f"{message}; did you mean {', '.join(f'{h} (for {g})' for g, h in hints)}?"
    return message
