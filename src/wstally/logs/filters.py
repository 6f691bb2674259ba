"""Which log lines ``wstally logs`` keeps: ``--event``, ``--level``, ``--client``, ``--conn``,
``--since``/``--until`` and ``--where``, all of which must match.

A filter gives two tests. The matcher decides on the parsed event. The prefilter runs first,
on the raw bytes: the literals a matching line must contain (an event's name, a client, a
connection, a field's value) reject most lines without parsing them.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wstally.logs.errors import LogsError
from wstally.logs.values import LEVELS, as_number, as_text
from wstally.logs.when import normal_ts, parse_time

__all__ = ["Condition", "Filter"]

_OPS = ("!=", ">=", "<=", "=", ">", "<")


@dataclass(slots=True)
class Condition:
    """``--where field=value`` (also ``!=``, ``>``, ``>=``, ``<``, ``<=``, numeric)."""

    field: str
    op: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Condition:
        for op in _OPS:
            name, found, value = text.partition(op)
            if found and name.strip():
                return cls(name.strip(), op, value.strip())
        raise LogsError(f"--where {text!r}: expected FIELD=VALUE (or !=, >, >=, <, <=)")

    def __call__(self, event: dict[str, Any]) -> bool:
        if self.field not in event:
            return self.op == "!="
        actual = event[self.field]
        if self.op == "=":
            return as_text(actual) == self.value
        if self.op == "!=":
            return as_text(actual) != self.value
        left, right = as_number(actual), as_number(self.value)
        if left is None or right is None:
            return False
        if self.op == ">":
            return left > right
        if self.op == ">=":
            return left >= right
        if self.op == "<":
            return left < right
        return left <= right


def _literal(text: str) -> bytes | None:
    """How ``text`` appears inside a JSON string as our renderer writes it, if safely known."""
    if not text:
        return None
    return json.dumps(text)[1:-1].encode()


def _glob_literal(pattern: str) -> bytes | None:
    if not re.search(r"[*?\[]", pattern):
        # An exact name: it appears with its quotes.
        return json.dumps(pattern).encode()
    pieces = re.split(r"\*|\?|\[[^\]]*\]?", pattern)
    longest = max(pieces, key=len)
    return _literal(longest)


def _containing(every: list[bytes], some: list[bytes]) -> Callable[[bytes], bool] | None:
    """A test that a raw line holds all of ``every`` and one of ``some`` (if any)."""
    if not every and not some:
        return None
    # The usual cases, one literal, without the generators' cost per line.
    if len(every) == 1 and not some:
        only = every[0]
        return lambda raw: only in raw
    if len(some) == 1 and not every:
        one = some[0]
        return lambda raw: one in raw
    return lambda raw: all(n in raw for n in every) and (not some or any(n in raw for n in some))


@dataclass(slots=True)
class Filter:
    events: list[str] = field(default_factory=list)
    level: int = 0
    client: str | None = None
    conn: str | None = None
    since: str | None = None
    until: str | None = None
    where: list[Condition] = field(default_factory=list)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Filter:
        level = 0
        if args.level is not None:
            if args.level.lower() not in LEVELS:
                raise LogsError(f"--level {args.level!r}: one of debug, info, warning, error")
            level = LEVELS[args.level.lower()]
        return cls(
            events=list(args.event or []),
            level=level,
            client=args.client,
            conn=args.conn,
            since=None if args.since is None else parse_time(args.since),
            until=None if args.until is None else parse_time(args.until),
            where=[Condition.parse(w) for w in args.where or []],
        )

    @property
    def empty(self) -> bool:
        return not (
            self.events
            or self.level
            or self.client
            or self.conn
            or self.since
            or self.until
            or self.where
        )

    def prefilter(self) -> Callable[[bytes], bool] | None:
        """A cheap test on the raw line that every matching line passes, or None."""
        return _containing(self._every_line_holds(), self._one_of_these())

    def _every_line_holds(self) -> list[bytes]:
        every: list[bytes] = []
        if self.client is not None:
            # The client's id or its name: both are JSON strings, quoted.
            every.append(json.dumps(self.client).encode())
        if self.conn:
            literal = _literal(self.conn)
            if literal is not None:
                every.append(b'"' + literal)
        for cond in self.where:
            if cond.op == "=":
                literal = _literal(cond.value)
                if literal is not None:
                    every.append(literal)
        return every

    def _one_of_these(self) -> list[bytes]:
        # Only when every --event pattern has a literal: one without would match any line.
        literals = [_glob_literal(p) for p in self.events]
        if self.events and all(lit is not None for lit in literals):
            return [lit for lit in literals if lit is not None]
        return []

    def matcher(self) -> Callable[[dict[str, Any]], bool] | None:
        if self.empty:
            return None
        exact = {p for p in self.events if not re.search(r"[*?\[]", p)}
        globs = [p for p in self.events if p not in exact]
        glob_re = re.compile("|".join(fnmatch.translate(p) for p in globs)) if globs else None
        level, client, conn = self.level, self.client, self.conn
        since, until, where = self.since, self.until, self.where

        def match(event: dict[str, Any]) -> bool:
            if exact or glob_re is not None:
                name = event.get("event")
                if not isinstance(name, str):
                    return False
                if name not in exact and (glob_re is None or not glob_re.match(name)):
                    return False
            if level and LEVELS.get(str(event.get("level")), 0) < level:
                return False
            if client is not None and event.get("client") != client and event.get("name") != client:
                return False
            if conn is not None and not str(event.get("conn", "")).startswith(conn):
                return False
            if since is not None or until is not None:
                ts = normal_ts(event.get("timestamp"))
                if ts is None:
                    return False
                if (since is not None and ts < since) or (until is not None and ts > until):
                    return False
            return all(cond(event) for cond in where)

        return match
