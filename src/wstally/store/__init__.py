"""Durable homes for the tally: one small, engine-neutral interface and its engines."""

from __future__ import annotations

from wstally.store.base import ROW_COLUMNS, Store, StoredState, StoreError, SyncFailed
from wstally.store.memory import MemoryStore
from wstally.store.sqlite import SQLiteStore

__all__ = [
    "ROW_COLUMNS",
    "MemoryStore",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoredState",
    "SyncFailed",
]
