"""The interface every store engine implements.

Engines are synchronous: the server calls ``commit`` on a dedicated thread when
``blocking`` is true, so an engine never needs to know about the event loop.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from wstally.tally import Update

__all__ = ["ROW_COLUMNS", "Store", "StoreError", "StoredState", "SyncFailed", "new_epoch"]

# A stored update as ``wstally history`` reads, prints and verifies it, column by column:
# the one list for the SQLite table and the Redis stream alike.
ROW_COLUMNS = ("seq", "at", "conn", "client", "name", "req_id", "delta", "total")


class StoreError(Exception):
    """The store cannot be opened or read; the message is meant for the operator."""


class SyncFailed(StoreError):
    """An fsync failed after the transaction was written: whether it reached the disk is
    unknown until a restart reads the file."""


@dataclass(slots=True)
class StoredState:
    epoch: str
    seq: int = 0
    total: int = 0
    # Recent updates that carried an id, oldest first, to rebuild the dedup memory.
    recent_ids: list[Update] = field(default_factory=list)


def new_epoch() -> str:
    return secrets.token_hex(8)


class Store(Protocol):
    # True when commit() does blocking I/O and must run off the event loop.
    blocking: bool
    description: str

    def load(self, window: int) -> StoredState: ...

    def commit(self, batch: Sequence[Update]) -> None:
        """Make every update in ``batch`` durable, all or nothing, or raise."""

    def history(self, since: int = 0, limit: int | None = None) -> list[Update]: ...

    def check(self) -> None:
        """Raise StoreError when commits can no longer be made durable where a restart
        finds them (the file deleted under us). Cheap: called before every commit and
        periodically when idle, on the same thread as the commits."""

    def close(self) -> None: ...
