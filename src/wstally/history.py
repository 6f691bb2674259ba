"""``wstally history``: the audit trail, one stored row per applied update, and its check.

The database is opened read-only and without the server's lock, so this works while a
server runs (SQLite WAL lets readers in beside the writer). ``--verify`` re-derives every
total from the deltas and checks the seq chain, and names the first row that breaks it.

With ``--redis`` the rows are the entries of a Redis engine's stream, read with plain reads
(``redis_history``). The stream keeps only the last updates: the chain is verified from
the first entry kept, whose total minus its delta is taken as the starting point, and it
must end where the meta hash says the history ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, Protocol

from wstally.store import ROW_COLUMNS, SQLiteStore, StoreError
from wstally.tally import in_int64
from wstally.text import escape_text

if TYPE_CHECKING:
    from wstally.redis_history import Entry, RedisHistory

__all__ = ["Verdict", "run", "verify", "verify_kept"]

# Exit statuses: 0 fine, 1 the chain is broken (--verify), 2 the history cannot be read.
BROKEN = 1
UNREADABLE = 2


def _time(at: Any) -> str:
    if isinstance(at, int | float) and not isinstance(at, bool):
        with contextlib.suppress(OverflowError, OSError, ValueError):
            moment = datetime.fromtimestamp(at, UTC)
            return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return escape_text(str(at), limit=None)


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
    """Check rows (``store.ROW_COLUMNS``) continue the chain from ``seq``/``total``.

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
    where = f"seq {escape_text(str(seq), limit=None)}"
    if not _is_int(seq):
        return f"after seq {previous}: seq {escape_text(repr(seq), limit=None)} is not an integer"
    if seq != previous + 1:
        if previous == 0:
            return f"{where}: the history must start at seq 1"
        return f"{where}: expected seq {previous + 1} after {previous} (a gap or a reorder)"
    if not _is_int(delta) or not in_int64(delta):
        return f"{where}: delta {escape_text(repr(delta), limit=None)} is not a 64-bit integer"
    if not _is_int(stored) or not in_int64(stored):
        return f"{where}: total {escape_text(repr(stored), limit=None)} is not a 64-bit integer"
    if not isinstance(at, int | float) or isinstance(at, bool):
        return f"{where}: time {escape_text(repr(at), limit=None)} is not a number"
    if not isinstance(conn, str) or not conn:
        return f"{where}: no connection id"
    expected = total + delta
    if stored != expected:
        return (
            f"{where}: total is {stored}, expected {expected} "
            f"(total {total} at seq {previous} + delta {delta})"
        )
    return None


def verify_kept(
    meta: Mapping[str, str], entries: Sequence[Entry], since: int = 0
) -> tuple[Verdict, str]:
    """Check the entries a Redis engine keeps (oldest first) against its ``meta`` hash.

    Beside the chain (as ``verify``): every entry is of the meta hash's epoch and stored
    under the id ``<seq>-0``, and the last one is the meta hash's seq and total. Returns the
    verdict and a note saying where the chain starts when it cannot start at seq 1.
    """
    problem = _meta_problem(meta, entries)
    if problem is not None:
        return Verdict(problem=problem), ""
    start = _start(entries, since)
    if isinstance(start, str):
        return Verdict(last_seq=since, problem=start), ""
    seq, total, chain, note = start
    found: list[str] = []
    verdict = verify(_entry_rows(chain, meta["epoch"], found), seq, total)
    if verdict.ok and found:
        verdict.problem = found[0]
    ends = (int(meta["seq"]), int(meta["total"]))
    if verdict.ok and (verdict.last_seq, verdict.total) != ends:
        verdict.problem = (
            f"the stream ends at seq {verdict.last_seq} (total {verdict.total}), "
            f"but the meta hash says seq {ends[0]} (total {ends[1]})"
        )
    return verdict, note


def _meta_problem(meta: Mapping[str, str], entries: Sequence[Entry]) -> str | None:
    if not meta:
        return f"the meta hash is missing, but the stream keeps {len(entries):,} entries"
    if not meta.get("epoch"):
        return "the meta hash holds no epoch"
    for field in ("seq", "total"):
        value = meta.get(field)
        if value is None or not re.fullmatch(r"-?[0-9]+", value):
            return (
                f"the meta hash's {field} {escape_text(repr(value), limit=None)} is not an integer"
            )
    return None


_SEQ, _DELTA, _TOTAL = (ROW_COLUMNS.index(c) for c in ("seq", "delta", "total"))


def _start(entries: Sequence[Entry], since: int) -> tuple[int, int, Sequence[Entry], str] | str:
    """Where the chain starts (seq, total, the entries after it, a note), or a problem."""
    if since > 0:
        for i, entry in enumerate(entries):
            if entry.row[_SEQ] == since:
                total = entry.row[_TOTAL]
                if type(total) is not int:
                    return f"no valid row at seq {since} to start from"
                return since, total, entries[i + 1 :], ""
        first = entries[0].row[_SEQ] if entries else None
        if type(first) is not int or since >= first:
            return f"no row at seq {since} to start from"
    if not entries:
        return 0, 0, entries, ""
    seq, delta, total = (entries[0].row[i] for i in (_SEQ, _DELTA, _TOTAL))
    if not (type(seq) is int and seq > 1 and type(delta) is int and type(total) is int):
        return 0, 0, entries, ""  # the whole history, or a first entry verify() will name
    note = (
        f"updates before seq {seq} are no longer kept in Redis: the chain starts from the "
        f"first kept entry's total minus its delta, {total - delta} at seq {seq - 1}"
    )
    return seq - 1, total - delta, entries, note


def _entry_rows(entries: Iterable[Entry], epoch: str, found: list[str]) -> Iterator[Any]:
    # What only a stream entry can get wrong, checked as verify() reaches it: the first
    # problem in seq order is the one reported, whichever check finds it.
    for entry in entries:
        seq = entry.row[_SEQ]
        if entry.epoch != epoch:
            found.append(
                f"seq {escape_text(str(seq), limit=None)}: "
                f"an entry of epoch {escape_text(repr(entry.epoch), limit=None)}, "
                f"not the meta hash's {escape_text(epoch, limit=None)}"
            )
            return
        if entry.last and type(seq) is int and entry.id != f"{seq}-0":
            shown = escape_text(entry.id, limit=None)
            found.append(f"seq {seq}: stored under the entry id {shown}, not {seq}-0")
            return
        yield entry.row


# Output


def _as_json(row: tuple[Any, ...]) -> str:
    obj = dict(zip(ROW_COLUMNS, row, strict=True))
    obj["time"] = _time(row[1])
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _text(value: Any) -> str:
    return "-" if value is None else escape_text(str(value), limit=None)


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


class _Rows(Protocol):
    def rows(
        self, since: int = 0, client: str | None = None, tail: int | None = None
    ) -> Iterator[tuple[Any, ...]]: ...


def _show(store: _Rows, args: argparse.Namespace, out: IO[str]) -> int:
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
        start = None if base is None else base[_TOTAL]
        if type(start) is not int:
            out.write(f"FAIL: no valid row at seq {args.since} to start from\n")
            return BROKEN
        seq, total = args.since, start
    verdict = verify(store.rows(args.since), seq, total)
    return _report(verdict, store.meta().get("epoch", "?"), "", out)


def _verify_redis(source: RedisHistory, args: argparse.Namespace, out: IO[str]) -> int:
    meta, entries = source.kept()
    verdict, note = verify_kept(meta, entries, args.since)
    return _report(verdict, meta.get("epoch", "?"), note, out)


def _report(verdict: Verdict, epoch: str, note: str, out: IO[str]) -> int:
    """One line: OK (exit 0), or FAIL naming the first inconsistency (exit 1)."""
    tail = f"{'; ' + note if note else ''} (epoch {escape_text(epoch, limit=None)})"
    if verdict.problem is not None:
        out.write(
            f"FAIL: {verdict.problem}; {verdict.rows:,} row(s) before it were consistent{tail}\n"
        )
        return BROKEN
    if verdict.rows == 0:
        out.write(f"OK: no updates after seq {verdict.last_seq}{tail}\n")
    else:
        out.write(
            f"OK: {verdict.rows:,} updates, seq {verdict.first_seq}..{verdict.last_seq}, "
            f"total {verdict.total}: every total is the previous total plus its delta{tail}\n"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    """``wstally history``: 0, 1 if ``--verify`` found an inconsistency, 2 if unreadable."""
    try:
        if args.redis is not None:
            return _guarded(_run_redis, args)
        return _guarded(_run_sqlite, args)
    except StoreError as exc:
        print(f"wstally history: error: {exc}", file=sys.stderr)
        return UNREADABLE


def _run_sqlite(args: argparse.Namespace) -> int:
    if not os.path.exists(args.db):
        raise StoreError(f"no database at {args.db}")
    store = SQLiteStore(args.db, readonly=True)
    try:
        if args.verify:
            return _verify(store, args, sys.stdout)
        return _show(store, args, sys.stdout)
    finally:
        store.close()


def _run_redis(args: argparse.Namespace) -> int:
    from wstally.redis_history import RedisHistory

    source = RedisHistory(args.redis, args.redis_prefix)
    try:
        if args.verify:
            return _verify_redis(source, args, sys.stdout)
        return _show(source, args, sys.stdout)
    finally:
        source.close()


def _guarded(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return command(args)
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
