"""``wstally history``: the audit trail, one stored row per applied update, and its check.

The database is opened read-only and without the server's lock, so this works while a
server runs (SQLite WAL lets readers in beside the writer). ``--verify`` re-derives every
total from the deltas and checks the seq chain, and names the first row that breaks it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from wstally.logview import safe
from wstally.store import SQLiteStore, StoreError
from wstally.tally import in_int64

__all__ = ["Verdict", "run", "verify"]

# Exit statuses: 0 fine, 1 the chain is broken (--verify), 2 the database cannot be read.
BROKEN = 1
UNREADABLE = 2


def _time(at: Any) -> str:
    if isinstance(at, int | float) and not isinstance(at, bool):
        with contextlib.suppress(OverflowError, OSError, ValueError):
            moment = datetime.fromtimestamp(at, UTC)
            return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return safe(str(at))


# Verification


def _is_int(value: Any) -> bool:
    return type(value) is int


@dataclass(slots=True)
class Verdict:
    rows: int = 0
    first_seq: int | None = None
    last_seq: int = 0
    total: int = 0
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(rows: Iterable[tuple[Any, ...]], seq: int = 0, total: int = 0) -> Verdict:
    """Check rows (``SQLiteStore.ROW_COLUMNS``) continue the chain from ``seq``/``total``.

    The first row must be ``seq + 1``, every next one the previous plus one, and every total
    the previous total plus the row's delta, within the signed 64-bit range.
    """
    verdict = Verdict(last_seq=seq, total=total)
    for row in rows:
        problem = _check(row, verdict.last_seq, verdict.total)
        if problem is not None:
            verdict.problem = problem
            return verdict
        verdict.rows += 1
        if verdict.first_seq is None:
            verdict.first_seq = row[0]
        verdict.last_seq, verdict.total = row[0], row[7]
    return verdict


def _check(row: tuple[Any, ...], previous: int, total: int) -> str | None:
    seq, at, conn, _client, _name, _req_id, delta, stored = row
    where = f"seq {safe(str(seq))}"
    if not _is_int(seq):
        return f"after seq {previous}: seq {safe(repr(seq))} is not an integer"
    if seq != previous + 1:
        if previous == 0:
            return f"{where}: the history must start at seq 1"
        return f"{where}: expected seq {previous + 1} after {previous} (a gap or a reorder)"
    if not _is_int(delta) or not in_int64(delta):
        return f"{where}: delta {safe(repr(delta))} is not a 64-bit integer"
    if not _is_int(stored) or not in_int64(stored):
        return f"{where}: total {safe(repr(stored))} is not a 64-bit integer"
    if not isinstance(at, int | float) or isinstance(at, bool):
        return f"{where}: time {safe(repr(at))} is not a number"
    if not isinstance(conn, str) or not conn:
        return f"{where}: no connection id"
    expected = total + delta
    if stored != expected:
        return (
            f"{where}: total is {stored}, expected {expected} "
            f"(total {total} at seq {previous} + delta {delta})"
        )
    return None


# Output


_ROW_KEYS = ("seq", "at", "conn", "client", "name", "req_id", "delta", "total")


def _as_json(row: tuple[Any, ...]) -> str:
    obj = dict(zip(_ROW_KEYS, row, strict=True))
    obj["time"] = _time(row[1])
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _text(value: Any) -> str:
    return "-" if value is None else safe(str(value))


def _as_line(row: tuple[Any, ...]) -> str:
    # Tab-separated, no header: for cut, awk and sort.
    seq, at, conn, client, name, req_id, delta, total = row
    delta_text = f"{delta:+d}" if _is_int(delta) else _text(delta)
    fields = (_text(seq), _time(at), delta_text, _text(total), _text(client), _text(name))
    return "\t".join((*fields, _text(conn), _text(req_id)))


_GREEN, _RED, _BOLD, _DIM, _RESET = "\x1b[32m", "\x1b[31m", "\x1b[1m", "\x1b[2m", "\x1b[0m"


def _cut(value: Any, width: int) -> str:
    text = _text(value)
    return text if len(text) <= width else text[: width - 1] + "…"


class _Table:
    """Aligned columns for a terminal, streamed: widths are fixed, long values cut."""

    HEADER = ("seq", "time (UTC)", "delta", "total", "client", "name", "conn")
    WIDTHS = (8, 24, 10, 12, 14, 16, 12)

    def __init__(self, out: IO[str], color: bool) -> None:
        self.out = out
        self.color = color
        self.rows = 0

    def _format(self, cells: tuple[str, ...]) -> str:
        parts = []
        for i, (cell, width) in enumerate(zip(cells, self.WIDTHS, strict=True)):
            parts.append(cell.rjust(width) if i in (0, 2, 3) else cell.ljust(width))
        return "  ".join(parts).rstrip()

    def row(self, row: tuple[Any, ...]) -> None:
        if self.rows % 40 == 0:
            header = self._format(self.HEADER)
            self.out.write(f"{_BOLD}{header}{_RESET}\n" if self.color else header + "\n")
        self.rows += 1
        seq, at, conn, client, name, _req_id, delta, total = row
        delta_text = f"{delta:+,d}" if _is_int(delta) else _text(delta)
        cells = (
            _text(seq),
            _time(at),
            delta_text,
            f"{total:,d}" if _is_int(total) else _text(total),
            _cut(client, 14),
            _cut(name, 16),
            _cut(conn, 12),
        )
        line = self._format(cells)
        if self.color and _is_int(delta):
            # Colour the delta column only: find it by its padded position.
            start = self.WIDTHS[0] + 2 + self.WIDTHS[1] + 2
            end = start + self.WIDTHS[2]
            tint = _GREEN if delta >= 0 else _RED
            line = f"{line[:start]}{tint}{line[start:end]}{_RESET}{line[end:]}"
        self.out.write(line + "\n")


def _show(store: SQLiteStore, args: argparse.Namespace, out: IO[str]) -> int:
    rows = store.rows(args.since, args.client, args.tail)
    if args.json:
        for row in rows:
            out.write(_as_json(row) + "\n")
    elif out.isatty():
        table = _Table(out, color="NO_COLOR" not in os.environ)
        for row in rows:
            table.row(row)
        if table.rows == 0:
            out.write("no updates\n")
    else:
        for row in rows:
            out.write(_as_line(row) + "\n")
    return 0


def _verify(store: SQLiteStore, args: argparse.Namespace, out: IO[str]) -> int:
    seq = total = 0
    if args.since:
        base = store.row(args.since)
        start = None if base is None else base[7]
        if type(start) is not int:
            out.write(f"FAIL: no valid row at seq {args.since} to start from\n")
            return BROKEN
        seq, total = args.since, start
    verdict = verify(store.rows(args.since), seq, total)
    epoch = store.meta().get("epoch", "?")
    if verdict.problem is not None:
        out.write(
            f"FAIL: {verdict.problem}; {verdict.rows:,} row(s) before it were consistent "
            f"(epoch {safe(epoch)})\n"
        )
        return BROKEN
    if verdict.rows == 0:
        out.write(f"OK: no updates after seq {seq} (epoch {safe(epoch)})\n")
    else:
        out.write(
            f"OK: {verdict.rows:,} updates, seq {verdict.first_seq}..{verdict.last_seq}, "
            f"total {verdict.total}: every total is the previous total plus its delta "
            f"(epoch {safe(epoch)})\n"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    """``wstally history``: 0, 1 if ``--verify`` found an inconsistency, 2 if unreadable."""
    if not os.path.exists(args.db):
        print(f"wstally history: error: no database at {args.db}", file=sys.stderr)
        return UNREADABLE
    try:
        store = SQLiteStore(args.db, readonly=True)
    except StoreError as exc:
        print(f"wstally history: error: {exc}", file=sys.stderr)
        return UNREADABLE
    try:
        if args.verify:
            return _verify(store, args, sys.stdout)
        return _show(store, args, sys.stdout)
    except StoreError as exc:
        print(f"wstally history: error: {exc}", file=sys.stderr)
        return UNREADABLE
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        store.close()
