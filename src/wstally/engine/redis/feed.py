"""The follower: the history's stream, read with XREAD, turned into the engine's feed.

It reads from the last seq it saw, checks that each entry continues the previous one (same
epoch, seq + 1) and queues ``Published`` chunks. An entry of another epoch, or a seq that
skips entries trimmed away meanwhile, turns into ``Reset``. Entries of a new history at or
below the last id read are invisible to XREAD, so whenever the stream is idle (each block
timeout), after a reconnect and when a batch saw a new epoch, it also reads the meta hash.
It is stopped by ``CLIENT UNBLOCK`` (sent by the engine), never by cancelling a call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from wstally.engine.base import FeedEvent, Position, Published, Reset
from wstally.engine.redis.entries import decode
from wstally.engine.redis.link import LOST, Link
from wstally.logsetup import get_logger
from wstally.tally import Update

__all__ = ["BLOCK_MS", "CHUNK", "Follower", "ReadPosition"]

# One XREAD or XRANGE returns at most this many entries. An entry is a batch: 100 entries
# of 100 updates took ~1.3 ms of Redis's time (1,000 of them 12.8 ms, blocking every node).
CHUNK = 100
# The follower's XREAD blocks this long, then reads the meta hash (and sees a new epoch
# whose entries XREAD cannot show). Well below the follower's socket timeout.
BLOCK_MS = 1000
_EVENTS_QUEUED = 64

# Reads the epoch, seq and total in Redis over the given client.
ReadPosition = Callable[[Redis], Awaitable[tuple[str, int, int]]]


class Follower:
    """Reads the stream from the last seq seen and queues feed events, reconnecting alone."""

    def __init__(
        self, client: Redis, log_key: str, link: Link, read_position: ReadPosition, start: Position
    ) -> None:
        self._client = client
        self._log_key = log_key
        self._link = link
        self._read_position = read_position
        self.epoch, self.seq, self.total = start.epoch, start.seq, start.total
        # None ends the feed; an exception ends it with that error.
        self.queue: asyncio.Queue[FeedEvent | BaseException | None] = asyncio.Queue(_EVENTS_QUEUED)
        self.stopping = asyncio.Event()
        self.blocked = False  # inside XREAD BLOCK: CLIENT UNBLOCK wakes it
        self.client_id: int | None = None
        self._check = True

    async def run(self) -> None:
        try:
            await self._follow()
        except Exception as exc:
            # A bug, not Redis: end the feed with it rather than leave it silent forever.
            _make_room(self.queue)
            self.queue.put_nowait(exc)
            raise

    def end(self) -> None:
        """Queue the end of the feed, after whatever the consumer has not read yet."""
        # Closing: the events nobody read no longer matter, the end-of-feed marker does.
        _make_room(self.queue)
        self.queue.put_nowait(None)

    async def _follow(self) -> None:
        delay = 0.05
        while not self.stopping.is_set():
            try:
                await self._step()
                delay = 0.05
            except LOST as exc:
                self._link.down(exc)
                await self._pause(delay)
                delay = min(delay * 2, 1.0)
            except RedisError as exc:
                # Not a lost connection (a key of the wrong type, a script error): keep
                # trying, loudly, rather than let the feed end in silence.
                get_logger("wstally.engine").error("engine.feed_failed", error=str(exc))
                await self._pause(1.0)

    async def _pause(self, delay: float) -> None:
        # A reconnection needs the id of the new connection and a fresh look at the meta.
        self.client_id = None
        self._check = True
        with contextlib.suppress(TimeoutError):  # cut short by close()
            await asyncio.wait_for(self.stopping.wait(), delay)

    def nudge(self) -> None:
        """Read the meta hash before the next XREAD (a batch saw another epoch)."""
        self._check = True

    async def _step(self) -> None:
        if self.client_id is None:
            self.client_id = int(await self._client.client_id())
        if self._check:
            await self._check_position()
            self._check = False
        self.blocked = True
        try:
            read = self._client.xread({self._log_key: f"{self.seq}-0"}, count=CHUNK, block=BLOCK_MS)
            reply: Any = await read
        finally:
            self.blocked = False
        self._link.up()
        if not reply:
            self._check = True
            return
        await self._publish(reply[0][1])

    async def _check_position(self) -> None:
        epoch, seq, total = await self._read_position(self._client)
        if epoch != self.epoch:
            await self._reset(Position(epoch, seq, total), "Redis holds a new history")
        elif seq < self.seq:
            await self._reset(Position(epoch, seq, total), "Redis lost committed updates")

    async def _publish(self, entries: list[Any]) -> None:
        updates: list[Update] = []
        for _id, f in entries:
            batch = decode(f)
            head = batch[0]
            if f[1] != self.epoch or head.seq != self.seq + 1:
                if updates:
                    await self._emit(Published(updates))
                    updates = []
                before = Position(f[1], head.seq - 1, head.total - head.delta)
                reason = (
                    "Redis holds a new history"
                    if f[1] != self.epoch
                    else f"updates {self.seq + 1} to {head.seq - 1} are no longer kept"
                )
                await self._reset(before, reason)
            updates += batch
            last = batch[-1]
            self.seq, self.total = last.seq, last.total
        if updates:
            await self._emit(Published(updates))

    async def _reset(self, position: Position, reason: str) -> None:
        self.epoch, self.seq, self.total = position.epoch, position.seq, position.total
        await self._emit(Reset(position, reason))

    async def _emit(self, event: FeedEvent) -> None:
        await self.queue.put(event)


def _make_room(queue: asyncio.Queue[Any]) -> None:
    # The queue is full only when nobody reads it: drop the oldest to fit a last event.
    while queue.full():
        queue.get_nowait()
