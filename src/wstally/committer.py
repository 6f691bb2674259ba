"""Group commit: applied updates wait here until the store has made them durable.

Only then are they acknowledged and broadcast, so no client ever hears of an update that a
crash could take back. While one batch is being written on the store's thread, the next one
accumulates, so a slow disk makes batches larger rather than the server slower.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from wstally import logsetup, protocol
from wstally.flow import Flow
from wstally.hub import Hub, Mode, Peer
from wstally.store import Store, StoreError
from wstally.tally import Duplicate, Tally, Update

__all__ = ["CommitWindow", "Committer"]

log = logsetup.get_logger("wstally.committer")

T = TypeVar("T")

STORE_FAILED = "the update could not be stored; total unchanged"

# A commit slower than this delays every ack waiting on it: worth a warning.
SLOW_COMMIT = 0.5

# Seconds between the store's health checks when idle (every commit checks anyway): a
# deleted database file is noticed within about this long even if no add comes.
CHECK_INTERVAL = 0.5

# At most this many updates per commit: one SQLite transaction of 4,096 rows takes a few
# milliseconds; what arrives meanwhile waits for the next round (and, past the flow gate's
# mark, is not read from the sockets at all).
MAX_BATCH = 4096


@dataclass(slots=True)
class CommitWindow:
    """Commits since the previous look (for ``server.stats``)."""

    commits: int = 0
    updates: int = 0
    max_batch: int = 0
    max_seconds: float = 0.0


class Committer:
    def __init__(self, tally: Tally, store: Store, hub: Hub, flow: Flow | None = None) -> None:
        self.tally = tally
        self.store = store
        self.hub = hub
        self.flow = flow if flow is not None else Flow(high=4 * MAX_BATCH, low=MAX_BATCH)
        self._updates: list[Update] = []
        # (peer, update or duplicate) to answer once the batch holding it is committed.
        self._waiters: list[tuple[Peer, Update | Duplicate]] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="wstally-store")
            if store.blocking
            else None
        )
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        # Why commits fail (for /healthz), or None: set by a failed commit or check,
        # cleared by the next good commit.
        self.degraded: str | None = None
        self.check_interval = CHECK_INTERVAL
        # Figures for stats: since the start, and since the last take_window().
        self.commits = 0
        self.committed = 0
        self.max_batch = 0
        self.max_commit_seconds = 0.0
        self.failures = 0
        self._window = CommitWindow()
        self.slow_commit = SLOW_COMMIT
        # One commit per batch, not per update, but still: skip building the event if unused.
        self._debug = logsetup.enabled_for(logging.DEBUG)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="committer")
        self._watcher = loop.create_task(self._watch(), name="store-check")

    def add(self, peer: Peer, update: Update) -> None:
        self._updates.append(update)
        if update.req_id is not None:
            self._waiters.append((peer, update))
        self.flow.level("commit", len(self._updates))
        self._kick()

    def duplicate(self, peer: Peer, dup: Duplicate) -> None:
        if dup.seq <= self.tally.committed_seq:
            self.hub.send(peer, protocol.encode_ack(dup.req_id, dup.seq, dup.total, True))
        else:
            # The original is still on its way to disk: answer after it, never before.
            self._waiters.append((peer, dup))
            self._kick()

    def _kick(self) -> None:
        self._idle.clear()
        self._wakeup.set()

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store read on the store's own thread, in turn with the commits."""
        if self._executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def drain(self) -> None:
        """Wait until everything submitted so far is committed and answered."""
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self._round()
            except Exception:
                # Never let one bad round stop every future ack: log it and go on.
                log.critical("committer.error", exc_info=True)
                if not self._updates and not self._waiters:
                    self._idle.set()  # or drain(), at shutdown, would wait for ever

    async def _round(self) -> None:
        loop = asyncio.get_running_loop()
        batch, self._updates = self._updates[:MAX_BATCH], self._updates[MAX_BATCH:]
        waiters = self._take_waiters(batch[-1].seq if batch else self.tally.committed_seq)
        if batch:
            started = time.perf_counter()
            try:
                if self._executor is not None:
                    await loop.run_in_executor(self._executor, self.store.commit, batch)
                else:
                    self.store.commit(batch)
            except Exception as exc:
                self._failed(batch, waiters, exc)
                return
            self._account(batch, time.perf_counter() - started)
            last = batch[-1]
            self.tally.commit(last.seq, last.total)
            self.hub.publish(batch)
        self._answer(waiters)
        self.flow.level("commit", len(self._updates))
        if self._updates or self._waiters:
            self._wakeup.set()  # the rest of a backlog longer than one batch
        else:
            self._idle.set()

    def _take_waiters(self, last: int) -> list[tuple[Peer, Update | Duplicate]]:
        """The waiters answerable once everything up to ``last`` is committed: a prefix,
        so that each connection's answers keep their order."""
        waiters = self._waiters
        cut = 0
        for _peer, item in waiters:
            if item.seq > last:
                break
            cut += 1
        if cut == len(waiters):
            self._waiters = []
            return waiters
        self._waiters = waiters[cut:]
        return waiters[:cut]

    async def _watch(self) -> None:
        # An idle store can lose its file too: look now and then on the store's thread, so
        # that /healthz and the log tell before the next add finds out.
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                await self.read(self.store.check)
            except Exception as exc:
                self.degraded = _reason(exc)

    def _account(self, batch: list[Update], seconds: float) -> None:
        self.degraded = None
        size = len(batch)
        self.commits += 1
        self.committed += size
        self.max_batch = max(self.max_batch, size)
        self.max_commit_seconds = max(self.max_commit_seconds, seconds)
        window = self._window
        window.commits += 1
        window.updates += size
        window.max_batch = max(window.max_batch, size)
        window.max_seconds = max(window.max_seconds, seconds)
        if seconds >= self.slow_commit:
            self._log_commit(logging.WARNING, "store.commit_slow", batch, seconds)
        elif self._debug:
            self._log_commit(logging.DEBUG, "store.committed", batch, seconds)

    def _log_commit(self, level: int, event: str, batch: list[Update], seconds: float) -> None:
        log.log(
            level,
            event,
            batch=len(batch),
            ms=round(seconds * 1000, 3),
            first_seq=batch[0].seq,
            last_seq=batch[-1].seq,
            pending=len(self._updates),
        )

    def take_window(self) -> CommitWindow:
        """The commit figures since the previous call, and start a new window."""
        window, self._window = self._window, CommitWindow()
        return window

    def _answer(self, waiters: list[tuple[Peer, Update | Duplicate]]) -> None:
        send = self.hub.send
        for peer, item in waiters:
            if isinstance(item, Update):
                assert item.req_id is not None
                send(peer, protocol.encode_ack(item.req_id, item.seq, item.total))
            else:
                send(peer, protocol.encode_ack(item.req_id, item.seq, item.total, True))

    def _failed(
        self, batch: list[Update], waiters: list[tuple[Peer, Update | Duplicate]], exc: Exception
    ) -> None:
        # Everything applied after the failed batch was built on it: refuse that too, and
        # bring memory back to what the store holds.
        self.failures += 1
        self.degraded = _reason(exc)
        self.flow.level("commit", 0)
        later, self._updates = self._updates, []
        waiters += self._waiters
        self._waiters = []
        dropped = self.tally.rollback()
        log.critical(
            "store.commit_failed",
            error=str(exc),
            error_type=type(exc).__name__,
            refused=dropped,
            first_seq=batch[0].seq,
            last_seq=(later or batch)[-1].seq,
            total=self.tally.total,
        )
        answered: set[int] = set()
        for peer, item in waiters:
            answered.add(id(item))
            if isinstance(item, Duplicate) and item.seq <= self.tally.committed_seq:
                # Its original is stored: that answer stands.
                self.hub.send(peer, protocol.encode_ack(item.req_id, item.seq, item.total, True))
            else:
                self._refuse(peer, item.req_id)
        by_conn = {peer.id: peer for peer in self.hub.peers}
        for update in batch + later:
            if id(update) not in answered and update.conn in by_conn:
                self._refuse(by_conn[update.conn], update.req_id)
        if not self._updates and not self._waiters:
            self._idle.set()

    def _refuse(self, peer: Peer, req_id: str | None) -> None:
        if peer.mode is Mode.JSON:
            self.hub.send(peer, protocol.encode_error("store_failed", STORE_FAILED, req_id))
        else:
            self.hub.send(peer, protocol.encode_plain_error(STORE_FAILED))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)


def _reason(exc: Exception) -> str:
    # A StoreError speaks to the operator already; anything else is a failed write.
    return str(exc) if isinstance(exc, StoreError) else f"commit failed: {exc}"
