"""A store that keeps recent history in memory only (``--memory``)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from wstally.store.base import StoredState, new_epoch
from wstally.tally import DEDUP_WINDOW, Update

__all__ = ["MemoryStore"]


class MemoryStore:
    blocking = False
    description = "memory"

    def __init__(self, keep: int = DEDUP_WINDOW) -> None:
        self.epoch = new_epoch()
        self._rows: deque[Update] = deque(maxlen=keep)

    def load(self, window: int) -> StoredState:
        last = self._rows[-1] if self._rows else None
        state = StoredState(self.epoch)
        if last is not None:
            state.seq, state.total = last.seq, last.total
            state.recent_ids = [u for u in self._rows if u.req_id is not None][-window:]
        return state

    def commit(self, batch: Sequence[Update]) -> None:
        self._rows.extend(batch)

    def history(self, since: int = 0, limit: int | None = None) -> list[Update]:
        rows = [u for u in self._rows if u.seq > since]
        return rows if limit is None else rows[:limit]

    def check(self) -> None:
        pass  # nothing on disk to lose

    def close(self) -> None:
        pass
