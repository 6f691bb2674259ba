"""Validated command-line values: numbers in a range, WebSocket URLs, ``WSTALLY_*`` defaults.

Every number a flag takes is checked against its range as it is parsed, and the environment
variable behind a flag goes through the same check, so a bad value is a usage error (exit 2)
that names the flag or the variable, never a traceback nor a silently different value.

Environment variables are read only for the command being run, after parsing: a bad
``WSTALLY_STATS_INTERVAL`` stops ``wstally serve``, not ``wstally --version``.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit

from websockets.exceptions import InvalidURI
from websockets.uri import parse_uri

__all__ = [
    "EnvOption",
    "apply_env",
    "boolean",
    "env_argument",
    "integer",
    "number",
    "ws_url",
]

ENV_PREFIX = "WSTALLY_"
_OPTIONS = "env_options"  # the namespace attribute listing a command's EnvOptions
_UNSET: Any = type("Unset", (), {"__repr__": lambda self: "(from the environment)"})()
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _bounds(kind: str, low: float | None, high: float | None, above: bool) -> str:
    if low is not None and high is not None:
        return f"{kind} from {low:g} to {high:g}"
    if low is not None:
        return f"{kind} {'greater than' if above else 'of at least'} {low:g}"
    return f"{kind} of at most {high:g}" if high is not None else kind


def integer(low: int | None = 0, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in [low, high]."""
    wanted = _bounds("an integer", low, high, above=False)

    def convert(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {wanted}")
        return value

    return convert


def number(
    low: float | None = 0.0, high: float | None = None, *, above: bool = False
) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in [low, high] (or (low, high] with ``above``)."""
    wanted = _bounds("a number", low, high, above)

    def convert(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        too_low = low is not None and (value <= low if above else value < low)
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text.strip()} is out of range: use {wanted}")
        return value

    return convert


def boolean(text: str) -> bool:
    """An environment switch: 1/true/yes/on or 0/false/no/off (any case), or empty."""
    value = text.strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise argparse.ArgumentTypeError(f"{text!r} is not a switch: use 1, true, yes, on or 0, false")


EXAMPLE_URL = "ws://127.0.0.1:8765/"


def ws_url(text: str) -> str:
    """An argparse ``type``: a ws:// or wss:// URL; a bare ``host:port`` means ``ws://host:port/``."""
    url = text.strip()
    if "://" not in url:
        url = f"ws://{url}"
    parts = urlsplit(url)
    if parts.scheme.lower() in ("http", "https"):
        scheme = "wss" if parts.scheme.lower() == "https" else "ws"
        suggestion = f"{scheme}://{parts.netloc}{parts.path or '/'}"
        raise argparse.ArgumentTypeError(
            f"{text!r} is an HTTP URL; the WebSocket URL would be {suggestion}"
        )
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
        parse_uri(url)
    except (ValueError, InvalidURI):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a WebSocket URL; use ws://HOST:PORT/ or wss://HOST:PORT/, "
            f"e.g. {EXAMPLE_URL}"
        ) from None
    return url if parts.path else f"{url}/"


@dataclass(frozen=True, slots=True)
class EnvOption:
    """A flag whose default comes from an environment variable, checked like the flag."""

    dest: str
    env: str
    convert: Callable[[str], Any] | None
    default: Any
    choices: Sequence[str] | None = None

    def value(self, fail: Callable[[str], NoReturn]) -> Any:
        raw = os.environ.get(self.env)
        if raw is None:
            return self.default
        try:
            value = self.convert(raw) if self.convert is not None else raw
        except argparse.ArgumentTypeError as exc:
            fail(f"{self.env}={raw!r}{_detail(exc, raw)}")
        if self.choices is not None and value not in self.choices:
            fail(f"{self.env}={raw!r}: use one of {', '.join(self.choices)}")
        return value


REDIS_SCHEMES = ("redis", "rediss", "unix")


def redis_url(text: str) -> str:
    """A Redis URL as redis-py reads it: redis://, rediss:// (TLS) or unix://."""
    parts = urlsplit(text.strip())
    if parts.scheme not in REDIS_SCHEMES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Redis URL: use redis://HOST:PORT/DB, rediss://... for TLS, "
            "or unix:///path/to/redis.sock"
        )
    if parts.scheme == "unix" and not parts.path:
        raise argparse.ArgumentTypeError(f"{text!r} names no socket: unix:///path/to/redis.sock")
    if parts.scheme != "unix" and not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} names no host: redis://HOST:PORT/DB")
    return text.strip()


def redis_prefix(text: str) -> str:
    """A name that is safe inside a Redis key's hash tag: no braces, no spaces."""
    if not text or len(text) > 64 or any(c in text for c in "{} \t\r\n"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use 1 to 64 characters without spaces or braces"
        )
    return text


def _detail(exc: argparse.ArgumentTypeError, raw: str) -> str:
    # The converters start their messages with the value; the variable already shows it.
    message = str(exc)
    for shown in (repr(raw), raw.strip()):
        if message.startswith(shown + " "):
            return message[len(shown) :]
    return f": {message}"


def env_argument(
    parser: argparse.ArgumentParser,
    *flags: str,
    env: str,
    default: Any,
    help: str,
    group: Any = None,
    shown: str | None = None,
    **kwargs: Any,
) -> argparse.Action:
    """``group.add_argument`` for a flag backed by ``WSTALLY_<env>``.

    The flag's own default is a marker (not a string, which argparse would convert), so
    that after parsing :func:`apply_env` can tell a flag given on the command line (which
    wins) from one to be taken from the environment.
    """
    name = ENV_PREFIX + env
    where = f"env {name}; default {default if shown is None else shown}"
    if default is None and shown is None:
        where = f"env {name}"
    target = group if group is not None else parser
    action: argparse.Action = target.add_argument(
        *flags, default=_UNSET, help=f"{help} [{where}]", **kwargs
    )
    # A switch (store_true) reads its variable as a boolean; others through the flag's type.
    convert = boolean if action.nargs == 0 and action.const is True else action.type
    option = EnvOption(action.dest, name, convert, default, kwargs.get("choices"))  # type: ignore[arg-type]
    parser.set_defaults(**{_OPTIONS: (*(parser.get_default(_OPTIONS) or ()), option)})
    return action


def apply_env(args: argparse.Namespace, parser: argparse.ArgumentParser) -> set[str]:
    """Fill every env-backed flag not given on the command line; a bad value is a usage error.

    Returns the dests it filled (from the environment or the default): the others were
    given on the command line, for a command where a flag must beat another flag's variable.
    """
    filled = set()
    for option in getattr(args, _OPTIONS, ()):
        if getattr(args, option.dest, _UNSET) is _UNSET:
            setattr(args, option.dest, option.value(parser.error))
            filled.add(option.dest)
    if hasattr(args, _OPTIONS):
        delattr(args, _OPTIONS)
    return filled
