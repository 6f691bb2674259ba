"""``wstally logs``: filter, follow, pretty-print and summarize wstally's JSON log lines.

Lines are streamed one at a time, never loaded whole. Filters that name a literal (an event,
a client, a connection, a field's value) first test the raw line for it, so that most lines
are rejected without being parsed; ``--json`` writes the matching lines back byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, Any, BinaryIO

__all__ = ["LEVELS", "Filter", "LogsError", "Summary", "parse_time", "run"]

LEVELS = {
    "debug": 10,
    "info": 20,
    "warning": 30,
    "warn": 30,
    "error": 40,
    "exception": 40,
    "critical": 50,
}

# Fields shown first, in this order, in the pretty output.
CONTEXT = ("conn", "client", "name", "peer", "mode")
_HIDDEN = frozenset(("timestamp", "level", "event", "logger", "exception", *CONTEXT))


class LogsError(Exception):
    """A bad option value; the message is meant for the user."""


# Time


_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _iso(moment: datetime) -> str:
    # The form structlog's TimeStamper writes (UTC, microseconds), so that bounds and
    # timestamps compare as plain strings.
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str, now: datetime | None = None) -> str:
    """``10m``, ``2h``, ``1h30m``, ``30s``, ``1d`` ago, or an ISO time (local unless it says).

    Returns the bound as an ISO string in the form of the log's timestamps.
    """
    text = text.strip()
    now = now if now is not None else datetime.now(UTC)
    if text and _RELATIVE.sub("", text) == "":
        seconds = sum(float(n) * _UNITS[unit] for n, unit in _RELATIVE.findall(text))
        return _iso(now - timedelta(seconds=seconds))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise LogsError(
            f"not a time: {text!r}; use an ISO time (2026-11-24T10:00, add Z for UTC) "
            "or a duration ago (30s, 10m, 2h, 1d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # what a person at this terminal means
    return _iso(moment)


def _normal_ts(ts: Any) -> str | None:
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
    return _iso(moment)


# Filters


_OPS = ("!=", ">=", "<=", "=", ">", "<")


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _as_int(value: Any) -> int:
    """A count from a log line; 0 for anything that is not a finite number."""
    if type(value) is int:
        return value
    number = _as_number(value)
    return 0 if number is None else int(number)


def _key(value: Any) -> Any:
    """``value`` as a dict key: what JSON gives may be a list or an object."""
    return value if value is None or isinstance(value, str | int | float) else _as_text(value)


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
            return _as_text(actual) == self.value
        if self.op == "!=":
            return _as_text(actual) != self.value
        left, right = _as_number(actual), _as_number(self.value)
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
        every: list[bytes] = []
        if self.client is not None:
            # The client's id or its name: both are JSON strings, quoted.
            needle = json.dumps(self.client).encode()
            every.append(needle)
        if self.conn:
            literal = _literal(self.conn)
            if literal is not None:
                every.append(b'"' + literal)
        for cond in self.where:
            if cond.op == "=":
                literal = _literal(cond.value)
                if literal is not None:
                    every.append(literal)
        some: list[bytes] = []
        if self.events:
            literals = [_glob_literal(p) for p in self.events]
            if all(lit is not None for lit in literals):
                some = [lit for lit in literals if lit is not None]
        if not every and not some:
            return None
        if len(every) == 1 and not some:
            only = every[0]
            return lambda raw: only in raw
        if len(some) == 1 and not every:
            one = some[0]
            return lambda raw: one in raw
        return lambda raw: (
            all(n in raw for n in every) and (not some or any(n in raw for n in some))
        )

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
                ts = _normal_ts(event.get("timestamp"))
                if ts is None:
                    return False
                if (since is not None and ts < since) or (until is not None and ts > until):
                    return False
            return all(cond(event) for cond in where)

        return match


# Reading


class _Tail:
    """One followed file, like ``tail -F``: survives rotation (rename) and truncation."""

    def __init__(self, path: str, from_end: bool) -> None:
        self.path = path
        self.file: BinaryIO | None = None
        self.inode: tuple[int, int] | None = None
        self.pending = b""
        self._open(from_end)

    def _open(self, at_end: bool) -> None:
        try:
            file = open(self.path, "rb")  # noqa: SIM115 - closed in close() or on rotation
        except OSError:
            return
        st = os.fstat(file.fileno())
        self.file, self.inode = file, (st.st_dev, st.st_ino)
        if at_end:
            file.seek(0, os.SEEK_END)

    def read(self) -> list[bytes]:
        lines: list[bytes] = []
        if self.file is None:
            self._open(False)
            if self.file is None:
                return lines
        self._drain(lines)
        if not lines:
            self._check(lines)
        return lines

    def _drain(self, lines: list[bytes]) -> None:
        assert self.file is not None
        for chunk in iter(self.file.readline, b""):
            if chunk.endswith(b"\n"):
                lines.append(self.pending + chunk if self.pending else chunk)
                self.pending = b""
            else:
                # A line still being written: wait for its end.
                self.pending += chunk

    def _check(self, lines: list[bytes]) -> None:
        assert self.file is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return  # moved away, not yet recreated: keep reading the old file meanwhile
        if (st.st_dev, st.st_ino) != self.inode:
            # Rotated: finish the old file, then start the new one from its beginning.
            self._drain(lines)
            if self.pending:
                lines.append(self.pending)
                self.pending = b""
            self.file.close()
            self.file = None
            self._open(False)
            if self.file is not None:
                self._drain(lines)
        elif st.st_size < self.file.tell():
            # Truncated in place (copytruncate): start over.
            self.file.seek(0)
            self.pending = b""
            self._drain(lines)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# Output


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


def safe(text: str, limit: int | None = None) -> str:
    """``text`` with every non-printable character escaped: log values come from peers."""
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _value(value: Any) -> str:
    if isinstance(value, str):
        if _SIMPLE.fullmatch(value):
            return safe(value)
        # Quoted as is: the server already escaped what a peer sent (\x1b stays readable).
        return '"' + safe(value).replace('"', '\\"') + '"'
    return safe(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _short_ts(ts: Any) -> str:
    normal = _normal_ts(ts)
    if normal is not None:
        return f"{normal[:10]} {normal[11:23]}Z"
    return safe(str(ts)) if ts is not None else "-"


def format_event(event: dict[str, Any], color: bool) -> str:
    """One event as one readable line (plus its exception, if any)."""
    level = str(event.get("level", "-"))
    name = safe(str(event.get("event", "-")))
    parts: list[str] = []
    logger = event.get("logger")
    if isinstance(logger, str) and not logger.startswith("wstally"):
        parts.append(f"logger={safe(logger)}")
    for key in CONTEXT:
        if key in event and event[key] is not None:
            parts.append(f"{key}={_value(event[key])}")
    for key, value in event.items():
        if key not in _HIDDEN:
            parts.append(f"{safe(key)}={_value(value)}")
    ts = _short_ts(event.get("timestamp"))
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
        return "\n".join("    " + safe(line) for line in exc.splitlines())
    lines: list[str] = []
    if isinstance(exc, list):
        for item in exc:
            if not isinstance(item, dict):
                continue
            frames = item.get("frames")
            if isinstance(frames, list) and frames and isinstance(frames[-1], dict):
                f = frames[-1]
                where = f"{f.get('filename')}:{f.get('lineno')} in {f.get('name')}"
                lines.append(f"    at {safe(where)}")
            lines.append(
                f"    {safe(str(item.get('exc_type')))}: {safe(str(item.get('exc_value')))}"
            )
    return "\n".join(lines) if lines else "    " + _value(exc)


# Summary


_CLOSE_CODES = {
    1000: "normal",
    1001: "going away",
    1002: "protocol error",
    1003: "unsupported data",
    1005: "no status",
    1006: "abnormal (no close frame)",
    1007: "invalid data",
    1008: "policy violation",
    1009: "message too big",
    1011: "internal error",
}


@dataclass(slots=True)
class _ClientFigures:
    name: str | None = None
    connections: int = 0
    seconds: float = 0.0
    adds: int = 0  # from conn.closed
    applied: int = 0  # from update.applied (debug)
    deltas: int = 0  # from update.applied (debug)
    refused: int = 0
    lagged: int = 0
    messages: int = 0


def _label(event: dict[str, Any]) -> str:
    client = event.get("client")
    if isinstance(client, str):
        return client
    peer = event.get("peer")
    host = peer.rpartition(":")[0] if isinstance(peer, str) else "?"
    kind = "plain" if event.get("mode") == "plain" else "no hello"
    return f"({kind}) {host}"


def _top(items: list[tuple[Any, ...]], item: tuple[Any, ...], keep: int) -> None:
    # A short sorted list beats a heap for the handful of rows a table shows.
    if len(items) < keep or item[0] > items[-1][0]:
        items.append(item)
        items.sort(key=lambda i: i[0], reverse=True)
        del items[keep:]


class Summary:
    """Aggregates for ``--summary``: every figure is built in one pass, line by line."""

    def __init__(self, top: int = 5) -> None:
        self.top = top
        self.events: dict[tuple[str, str], int] = {}
        self.first: str | None = None
        self.last: str | None = None
        self.clients: dict[str, _ClientFigures] = {}
        self._by_conn: dict[str, _ClientFigures] = {}
        self.applied_events = 0
        self.refusals: dict[str, list[Any]] = {}
        self.close_codes: dict[Any, list[Any]] = {}
        # Slowest commits: each one (debug store.committed, or store.commit_slow), or else
        # the slowest of each server.stats interval.
        self.commits: list[tuple[Any, ...]] = []
        self.interval_commits: list[tuple[Any, ...]] = []
        self.talkers: list[tuple[Any, ...]] = []
        self.open_conns: dict[str, None] = {}
        self.starts = 0
        self.lag_episodes = 0
        self.failures = 0
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "conn.opened": self._opened,
            "conn.closed": self._closed,
            "update.applied": self._applied,
            "update.refused": self._refused,
            "server.stats": self._stats,
            "server.started": self._started,
            "store.committed": self._committed,
            "store.commit_slow": self._committed,
            "store.commit_failed": self._failed,
            "broadcast.lagging": self._lagging,
        }

    def add(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        level = event.get("level")
        if type(name) is not str or type(level) is not str:
            name, level = str(name), str(level)
        key = (name, level)
        events = self.events
        events[key] = events.get(key, 0) + 1
        ts = event.get("timestamp")
        if type(ts) is str:
            # Lines usually come in time order: one comparison for most of them.
            if self.last is None or ts > self.last:
                self.last = ts
            elif self.first is None or ts < self.first:
                self.first = ts
            if self.first is None:
                self.first = ts
        handler = self._handlers.get(name)
        if handler is not None:
            handler(event)

    def _client(self, event: dict[str, Any]) -> _ClientFigures:
        label = _label(event)
        figures = self.clients.get(label)
        if figures is None:
            figures = self.clients[label] = _ClientFigures()
        name = event.get("name")
        if isinstance(name, str):
            figures.name = name
        return figures

    def _opened(self, event: dict[str, Any]) -> None:
        conn = event.get("conn")
        if isinstance(conn, str):
            self.open_conns[conn] = None

    def _closed(self, event: dict[str, Any]) -> None:
        conn = event.get("conn")
        if isinstance(conn, str):
            self.open_conns.pop(conn, None)
            self._by_conn.pop(conn, None)
        figures = self._client(event)
        figures.connections += 1
        figures.seconds += _as_number(event.get("duration")) or 0.0
        figures.adds += _as_int(event.get("applied"))
        figures.refused += _as_int(event.get("refused"))
        figures.lagged += _as_int(event.get("lagged"))
        messages = _as_int(event.get("messages_in"))
        figures.messages += messages
        entry = self.close_codes.setdefault(_key(event.get("code")), [0, {}])
        entry[0] += 1
        reason = _key(event.get("reason"))
        if reason:
            entry[1][reason] = entry[1].get(reason, 0) + 1
        _top(
            self.talkers,
            (
                messages,
                str(conn),
                _label(event),
                event.get("name"),
                event.get("peer"),
                event.get("applied"),
                event.get("refused"),
                event.get("bytes_in"),
                event.get("duration"),
            ),
            self.top,
        )

    def _applied(self, event: dict[str, Any]) -> None:
        self.applied_events += 1
        # Once a connection has added, its client is settled (no hello after an add).
        conn = event.get("conn")
        figures = self._by_conn.get(conn) if type(conn) is str else None
        if figures is None:
            figures = self._client(event)
            if type(conn) is str:
                self._by_conn[conn] = figures
        figures.applied += 1
        delta = event.get("delta")
        if isinstance(delta, int):
            figures.deltas += delta

    def _refused(self, event: dict[str, Any]) -> None:
        code = str(event.get("code"))
        entry = self.refusals.get(code)
        if entry is None:
            entry = self.refusals[code] = [0, event.get("input")]
        entry[0] += 1

    def _stats(self, event: dict[str, Any]) -> None:
        ms = _as_number(event.get("commit_max_ms"))
        if ms:
            batch = event.get("batch_max")
            item = (ms, event.get("timestamp"), batch, "server.stats (interval max)")
            _top(self.interval_commits, item, self.top)

    def _started(self, event: dict[str, Any]) -> None:
        self.starts += 1

    def _committed(self, event: dict[str, Any]) -> None:
        ms = _as_number(event.get("ms"))
        if ms is not None:
            item = (ms, event.get("timestamp"), event.get("batch"), str(event.get("event")))
            _top(self.commits, item, self.top)

    def _failed(self, event: dict[str, Any]) -> None:
        self.failures += 1

    def _lagging(self, event: dict[str, Any]) -> None:
        self.lag_episodes += 1

    # Rendering

    def render(self, out: IO[str], totals: Counts, width: int | None = None) -> None:
        from rich.console import Console

        console = Console(file=out, width=width, highlight=False)
        for table in self.tables(totals):
            console.print(table)

    def tables(self, totals: Counts) -> list[Any]:
        from rich.table import Table
        from rich.text import Text

        def cell(value: Any, limit: int = 40) -> Text:
            return Text("-" if value is None else safe(str(value), limit))

        overview = Table(title="wstally logs --summary", show_header=False, title_justify="left")
        overview.add_column("what", style="bold")
        overview.add_column("value")
        span = f"{_short_ts(self.first)} → {_short_ts(self.last)}" if self.first else "-"
        rows = [
            ("lines read", f"{totals.lines:,}"),
            ("events matched", f"{totals.matched:,}"),
            ("malformed lines", f"{totals.malformed:,}"),
            ("time span (UTC)", span),
            ("server starts", f"{self.starts:,}"),
            ("lag episodes", f"{self.lag_episodes:,}"),
            ("store failures", f"{self.failures:,}"),
            ("connections open at the end", f"{len(self.open_conns):,}"),
        ]
        for what, value in rows:
            overview.add_row(what, value)
        tables: list[Any] = [overview]

        events = Table(title="Events", title_justify="left")
        events.add_column("event")
        events.add_column("level")
        events.add_column("count", justify="right")
        for (name, level), count in sorted(self.events.items(), key=lambda kv: -kv[1]):
            events.add_row(cell(name, 60), cell(level), f"{count:,}")
        levels: dict[str, int] = {}
        for (_, level), count in self.events.items():
            levels[level] = levels.get(level, 0) + count
        by_level = Table(title="Levels", title_justify="left")
        by_level.add_column("level")
        by_level.add_column("count", justify="right")
        for level, count in sorted(levels.items(), key=lambda kv: -LEVELS.get(kv[0], 0)):
            by_level.add_row(cell(level), f"{count:,}")
        tables += [events, by_level]

        from_debug = self.applied_events > 0
        source = (
            "adds and Σ delta from update.applied (debug)"
            if from_debug
            else "adds from conn.closed applied counts; Σ delta needs --log-level debug"
        )
        clients = Table(title="Clients", caption=source, title_justify="left")
        for column in ("client", "name"):
            clients.add_column(column)
        for column in ("connections", "time connected", "adds", "Σ delta", "refused", "lagged"):
            clients.add_column(column, justify="right")
        ranked = sorted(self.clients.items(), key=lambda kv: (-kv[1].connections, kv[0]))
        for label, f in ranked[: max(self.top * 4, 20)]:
            adds = f.applied if from_debug else f.adds
            clients.add_row(
                cell(label),
                cell(f.name),
                f"{f.connections:,}",
                _duration(f.seconds),
                f"{adds:,}",
                f"{f.deltas:+,}" if from_debug else "-",
                f"{f.refused:,}",
                f"{f.lagged:,}",
            )
        if len(ranked) > max(self.top * 4, 20):
            clients.add_row(Text(f"… {len(ranked) - max(self.top * 4, 20):,} more"))
        tables.append(clients)

        refusals = Table(title="Refusals by code", title_justify="left")
        refusals.add_column("code")
        refusals.add_column("count", justify="right")
        refusals.add_column("example input")
        for code, (count, example) in sorted(self.refusals.items(), key=lambda kv: -kv[1][0]):
            refusals.add_row(cell(code), f"{count:,}", cell(example, 50))
        closes = Table(title="Close codes", title_justify="left")
        closes.add_column("code")
        closes.add_column("meaning")
        closes.add_column("count", justify="right")
        closes.add_column("most common reason")
        for code, (count, reasons) in sorted(self.close_codes.items(), key=lambda kv: -kv[1][0]):
            reason = max(reasons.items(), key=lambda kv: kv[1])[0] if reasons else None
            meaning = _CLOSE_CODES.get(code) if isinstance(code, int) else None
            closes.add_row(cell(code), cell(meaning), f"{count:,}", cell(reason, 50))
        tables += [refusals, closes]

        commits = Table(title="Slowest commits", title_justify="left")
        commits.add_column("ms", justify="right")
        commits.add_column("batch", justify="right")
        commits.add_column("when (UTC)")
        commits.add_column("from")
        for ms, ts, batch, source_event in self.commits or self.interval_commits:
            commits.add_row(f"{ms:,.3f}", cell(batch), _short_ts(ts), cell(source_event))
        talkers = Table(title="Top talkers (messages in)", title_justify="left")
        for column in ("conn", "client", "name", "peer"):
            talkers.add_column(column)
        for column in ("messages", "applied", "refused", "bytes in", "seconds"):
            talkers.add_column(column, justify="right")
        for messages, conn, label, name, peer, applied, refused, bytes_in, secs in self.talkers:
            talkers.add_row(
                cell(conn),
                cell(label),
                cell(name),
                cell(peer),
                f"{messages:,}",
                cell(applied),
                cell(refused),
                cell(bytes_in),
                cell(secs),
            )
        tables += [commits, talkers]
        return tables


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# Driving


@dataclass(slots=True)
class Counts:
    lines: int = 0
    matched: int = 0
    malformed: int = 0
    first_malformed: str | None = None


class _Sink:
    def __init__(self, args: argparse.Namespace, out: IO[bytes]) -> None:
        self.out = out
        self.json = args.json
        self.color = not args.json and out.isatty() and "NO_COLOR" not in os.environ

    def emit(self, raw: bytes, event: dict[str, Any]) -> None:
        if self.json:
            self.out.write(raw if raw.endswith(b"\n") else raw + b"\n")
        else:
            self.out.write(format_event(event, self.color).encode() + b"\n")


# The C scanner under json.loads, called directly: a JSON log line is one object that
# starts at its first byte, and skipping loads()'s layers (encoding detection on bytes,
# whitespace checks) parses such lines about a third faster.
_scan_once: Callable[[str, int], tuple[Any, int]] = getattr(  # noqa: B009 - not in the stubs
    json.JSONDecoder(), "scan_once"
)


def _parse(raw: bytes) -> dict[str, Any] | None:
    """The JSON object on this line, or None if it is anything else."""
    try:
        text = raw.decode()
        event, end = _scan_once(text, 0)
    except (ValueError, StopIteration):
        try:  # leading whitespace, say: the slow, general way
            event = json.loads(raw)
        except ValueError:
            return None
    else:
        if end != len(text) and not text[end:].isspace():
            return None
    return event if type(event) is dict else None


class Scanner:
    """Runs lines through the filter into a sink (or a summary), counting as it goes."""

    def __init__(self, flt: Filter, emit: Callable[[bytes, dict[str, Any]], None]) -> None:
        self.pre = flt.prefilter()
        self.match = flt.matcher()
        self.emit = emit
        self.counts = Counts()
        self._lines_seen: dict[str, int] = {}  # per source, for --follow's batches

    def scan(self, lines: Iterable[bytes], where: str) -> None:
        pre, match, emit, counts = self.pre, self.match, self.emit, self.counts
        parse = _parse
        start = number = self._lines_seen.get(where, 0)
        for number, raw in enumerate(lines, start + 1):
            if pre is not None and not pre(raw):
                if (raw[:1] != b"{" or not raw.rstrip().endswith(b"}")) and raw.strip():
                    self._malformed(where, number)
                continue
            event = parse(raw)
            if event is None:
                if raw.strip():
                    self._malformed(where, number)
                continue
            if match is not None and not match(event):
                continue
            counts.matched += 1
            emit(raw, event)
        counts.lines += number - start
        self._lines_seen[where] = number

    def _malformed(self, where: str, number: int) -> None:
        self.counts.malformed += 1
        if self.counts.first_malformed is None:
            self.counts.first_malformed = f"{where}:{number}"


def _follow(
    paths: list[str], scanner: Scanner, out: IO[bytes], poll: float, from_end: bool
) -> None:
    tails = [_Tail(path, from_end) for path in paths]
    try:
        while True:
            idle = True
            for tail in tails:
                lines = tail.read()
                if lines:
                    idle = False
                    scanner.scan(lines, tail.path)
            if idle:
                out.flush()
                time.sleep(poll)
    finally:
        for tail in tails:
            tail.close()


def run(args: argparse.Namespace) -> int:
    """``wstally logs``: exit 0, or 2 on a bad option or an unreadable file."""
    try:
        flt = Filter.from_args(args)
    except LogsError as exc:
        print(f"wstally logs: error: {exc}", file=sys.stderr)
        return 2
    if args.summary and args.follow:
        print(
            "wstally logs: error: --summary reads to the end; it cannot --follow", file=sys.stderr
        )
        return 2
    out = sys.stdout.buffer
    summary = Summary(args.top) if args.summary else None
    if summary is not None:
        scanner = Scanner(flt, lambda _raw, event: summary.add(event))
    else:
        scanner = Scanner(flt, _Sink(args, out).emit)
    try:
        status = _run(args, scanner, out)
        if summary is not None:
            width = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120
            summary.render(sys.stdout, scanner.counts, width)
        sys.stdout.flush()
        out.flush()
    except LogsError as exc:
        print(f"wstally logs: error: {exc}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        status = 130
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, and keep Python from complaining
        # when it flushes stdout at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 0
    counts = scanner.counts
    if counts.malformed:
        print(
            f"wstally logs: skipped {counts.malformed:,} malformed line(s) "
            f"(first at {counts.first_malformed})",
            file=sys.stderr,
        )
    return status


def _run(args: argparse.Namespace, scanner: Scanner, out: IO[bytes]) -> int:
    paths = list(args.files) or ["-"]
    if args.follow and paths != ["-"]:
        if "-" in paths:
            raise LogsError("--follow reads files; '-' (stdin) cannot be followed with them")
        _follow(paths, scanner, out, args.poll_interval, from_end=args.since is None)
        return 0
    status = 0
    for path in paths:
        if path == "-":
            scanner.scan(sys.stdin.buffer, "<stdin>")
            continue
        try:
            file = open(path, "rb")  # noqa: SIM115 - closed right after it is read
        except OSError as exc:
            print(f"wstally logs: error: cannot read {path}: {exc.strerror}", file=sys.stderr)
            status = 2
            continue
        with file:
            scanner.scan(file, path)
    return status
