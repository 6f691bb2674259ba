"""The engine seam: the one authority that orders, deduplicates and stores adds.

The server never assigns a seq itself. It hands the engine batches of adds and answers each
client from the engine's results; every committed update reaches the hub through the
engine's feed, in seq order, whether it came from this node or another one. The local
engine (the tally core plus a SQLite or memory journal) and the Redis engine (one Lua script
per batch, a stream for the feed) implement the same contract and pass the same tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from wstally.tally import Duplicate, Refused, Update

__all__ = [
    "Engine",
    "EngineError",
    "FeedEvent",
    "Position",
    "Published",
    "Reset",
    "Result",
    "Submission",
]


class Submission(NamedTuple):
    """One add as a connection hands it to the engine (already parsed and in int64); a named
    tuple, as ``Update`` is, since one is built per add."""

    delta: int
    conn: str
    at: float
    client: str | None = None
    name: str | None = None
    req_id: str | None = None


# Per submission, in order: applied (with its seq and total), a duplicate of an earlier add
# (with the original's seq and total), or refused (overflow: nothing changed).
Result = Update | Duplicate | Refused


@dataclass(frozen=True, slots=True)
class Position:
    """Where a history stands: its identity (epoch) and its last committed update."""

    epoch: str
    seq: int
    total: int


@dataclass(frozen=True, slots=True)
class Published:
    """Committed updates, consecutive seqs continuing the previous event exactly."""

    updates: Sequence[Update]


@dataclass(frozen=True, slots=True)
class Reset:
    """The history changed under us (a new epoch) or the feed cannot continue without a gap:
    everything before is superseded; live updates continue from ``position``."""

    position: Position
    reason: str


FeedEvent = Published | Reset


class EngineError(Exception):
    """A batch was not applied, or its outcome is unknown.

    ``code`` is the protocol error code the clients get (``store_failed``, ``unavailable``);
    ``transient`` tells clients to resend later with the same ids (dedup makes that safe even
    when the outcome was unknown).
    """

    def __init__(self, code: str, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.transient = transient


class Engine(Protocol):
    name: str  # "sqlite", "memory", "redis"
    description: str  # for the log: the file, or the Redis URL without its password

    async def open(self) -> Position:
        """Connect or load; the feed starts right after the position returned."""

    async def submit(self, batch: Sequence[Submission]) -> list[Result]:
        """Apply ``batch`` atomically and durably, one result per submission, in order.

        Called by one caller at a time (the server's batcher), never concurrently. Raises
        EngineError when nothing was applied or the outcome could not be learned in time.
        """

    def feed(self) -> AsyncIterator[FeedEvent]:
        """Every committed update, from every node, in seq order; ``Reset`` on a new history."""

    async def history(self, since: int, limit: int) -> list[Update]:
        """Committed updates after ``since``, in seq order, at most ``limit`` of them.

        The result may start later than ``since + 1`` when older updates are no longer kept.
        """

    def status(self) -> dict[str, Any]:
        """For /healthz: at least ``engine``; ``degraded`` (a reason) when it cannot commit."""

    async def close(self) -> None: ...
