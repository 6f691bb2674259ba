"""Flags backed by ``WSTALLY_*`` variables, declared as rows of a table.

Each flag's variable is its name in capitals (``--buffer-limit``: ``WSTALLY_BUFFER_LIMIT``),
so a table lists only what differs from one flag to the next.
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

from wstally.options import env_argument

__all__ = ["Flag", "add_flags", "flag", "switch"]


class Flag(NamedTuple):
    """One ``--flag``: its default, its help, and any other ``add_argument`` options."""

    name: str
    default: Any
    help: str
    options: dict[str, Any]


def flag(name: str, default: Any, help: str, **options: Any) -> Flag:
    return Flag(name, default, help, options)


def switch(name: str, help: str) -> Flag:
    """An on/off flag, off unless given (or its variable is set to a true value)."""
    return flag(name, False, help, shown="off", action="store_true")


def add_flags(parser: argparse.ArgumentParser, *flags: Flag, group: Any = None) -> None:
    """Add ``flags`` in order, to ``group`` if given (an argument or mutually exclusive group)."""
    for name, default, text, options in flags:
        env = name.removeprefix("--").upper().replace("-", "_")
        env_argument(parser, name, group=group, env=env, default=default, help=text, **options)
