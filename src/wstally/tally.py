"""The shared total, free of I/O: sequence numbers, int64 bounds and duplicate detection.

The caller supplies everything from the outside world (the time, who sent an add), so this
module can be tested exhaustively without sockets, clocks or a database.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "DEDUP_WINDOW",
    "INT64_MAX",
    "INT64_MIN",
    "Duplicate",
    "Refused",
    "Tally",
    "Update",
    "in_int64",
]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# The protocol promises to recognise a resent id for at least this many updates.
DEDUP_WINDOW = 100_000


def in_int64(value: int) -> bool:
    return INT64_MIN <= value <= INT64_MAX


class Update(NamedTuple):
    """One applied update: a row of the audit trail and an item of the broadcast.

    A named tuple, not a frozen dataclass: one is built per add, and a frozen dataclass's
    __init__ (a setattr call per field) cost 0.8 µs against 0.24 µs.
    """

    seq: int
    delta: int
    total: int
    at: float
    conn: str
    client: str | None = None
    name: str | None = None
    req_id: str | None = None

    @property
    def scope(self) -> str:
        return dedup_scope(self.client, self.conn)


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A resent ``(scope, id)`` that was already applied: answer with the original result."""

    req_id: str
    seq: int
    total: int


@dataclass(frozen=True, slots=True)
class Refused:
    code: str
    message: str


def dedup_scope(client: str | None, conn: str) -> str:
    # Without a hello, ids are only meaningful within their own connection. The prefixes keep
    # a client that names itself "conn:..." from sharing a connection's ids.
    return "client:" + client if client is not None else "conn:" + conn


class Tally:
    """The running total and its history position.

    Updates are applied in memory at once (so seq numbers are assigned in arrival order) and
    become *committed* when the store has made them durable. If a commit fails, ``rollback``
    forgets every uncommitted update so that memory matches the store again.
    """

    def __init__(
        self, epoch: str, seq: int = 0, total: int = 0, window: int = DEDUP_WINDOW
    ) -> None:
        self.epoch = epoch
        self.seq = seq
        self.total = total
        self.committed_seq = seq
        self.committed_total = total
        self.window = window
        # (scope, id) -> (seq, total), in seq order so the oldest is evicted first.
        self._ids: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()

    def remember(self, scope: str, req_id: str, seq: int, total: int) -> None:
        """Restore a committed id from the store (on start)."""
        self._ids[(scope, req_id)] = (seq, total)

    def lookup(self, scope: str, req_id: str) -> tuple[int, int] | None:
        return self._ids.get((scope, req_id))

    def apply(
        self,
        delta: int,
        *,
        conn: str,
        at: float,
        client: str | None = None,
        name: str | None = None,
        req_id: str | None = None,
    ) -> Update | Duplicate | Refused:
        """Apply one add in memory: the next seq and the new total, or why not.

        A ``req_id`` already seen in its scope (the hello client, else the connection) is a
        ``Duplicate`` carrying the original seq and total, whatever the delta now; a delta or
        a total outside int64 is ``Refused`` and changes nothing. The update is not durable
        yet: ``commit`` marks it so, ``rollback`` forgets it.
        """
        key = None
        if req_id is not None:
            key = (dedup_scope(client, conn), req_id)
            seen = self._ids.get(key)
            if seen is not None:
                return Duplicate(req_id, seen[0], seen[1])
        if not in_int64(delta):
            return Refused("bad_delta", "delta must be in the signed 64-bit range")
        total = self.total + delta
        if not in_int64(total):
            return Refused(
                "overflow",
                f"adding {delta} would take the total out of the signed 64-bit range; "
                "total unchanged",
            )
        self.seq += 1
        self.total = total
        if key is not None:
            self._ids[key] = (self.seq, total)
        return Update(self.seq, delta, total, at, conn, client, name, req_id)

    def commit(self, seq: int, total: int) -> None:
        """Mark everything up to ``seq`` durable, and forget ids older than the window."""
        self.committed_seq = seq
        self.committed_total = total
        horizon = seq - self.window
        ids = self._ids
        while ids:
            oldest = next(iter(ids.values()))
            if oldest[0] > horizon:
                break
            ids.popitem(last=False)

    def rollback(self) -> int:
        """Forget every uncommitted update; returns how many were dropped."""
        dropped = self.seq - self.committed_seq
        ids = self._ids
        while ids:
            key, (seq, _total) = next(reversed(ids.items()))
            if seq <= self.committed_seq:
                break
            del ids[key]
        self.seq = self.committed_seq
        self.total = self.committed_total
        return dropped

    @property
    def remembered(self) -> int:
        return len(self._ids)
