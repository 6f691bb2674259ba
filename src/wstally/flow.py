"""Backpressure: when commits or broadcasts fall behind, connections stop being read.

Each stage reports its backlog (updates waiting for it). Above ``high`` the gate closes:
handlers finish the frame in hand and wait before reading the next, so websockets' small
receive queue fills and the kernel's socket buffers push back on the senders. Below ``low``
(every stage) it opens again. Without it, a legal but heavy load made commit batches of
200,000 updates and broadcast frames of 30 MB (see docs/reliability.md).
"""

from __future__ import annotations

import asyncio

__all__ = ["Flow"]


class Flow:
    def __init__(self, high: int, low: int) -> None:
        self.high = high
        self.low = low
        self.blocked = False
        self.released = False  # at shutdown: never block again
        self._levels: dict[str, int] = {}
        self._open: asyncio.Event | None = None
        self.blocks = 0  # how many times the gate closed (for stats)

    def level(self, stage: str, backlog: int) -> None:
        """Report ``stage``'s backlog; cheap enough to call per update."""
        self._levels[stage] = backlog
        if self.blocked:
            if backlog <= self.low and all(v <= self.low for v in self._levels.values()):
                self._unblock()
        elif backlog > self.high and not self.released:
            self.blocked = True
            self.blocks += 1

    async def wait(self) -> None:
        """Until the gate opens (handlers call this only when ``blocked``)."""
        if not self.blocked:
            return
        if self._open is None:
            self._open = asyncio.Event()
        await self._open.wait()

    def _unblock(self) -> None:
        self.blocked = False
        if self._open is not None:
            self._open.set()
            self._open = None

    def release_all(self) -> None:
        """Open the gate for good: a shutdown answers everything already read."""
        self.released = True
        self._unblock()
