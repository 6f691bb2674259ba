"""Group commit, whatever the engine: adds wait here and go to the engine a batch at a time.

While one batch is with the engine (a SQLite transaction, a Redis script), the next one
accumulates, so a slow disk or a distant Redis makes batches larger rather than the server
slower. Each sender is answered from the engine's results only: an ack means the engine
holds the update durably. The broadcast does not come from here: it comes from the engine's
feed, the same way for this node's updates and for other nodes'.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from wstally import logsetup, protocol
from wstally.engine.base import Engine, EngineError, Result, Submission
from wstally.flow import Flow
from wstally.hub import Hub, Peer
from wstally.metrics import Tallies
from wstally.tally import Duplicate, Refused, Update

__all__ = ["MAX_BATCH", "SLOW_COMMIT", "Batcher", "CommitWindow"]

log = logsetup.get_logger("wstally.batcher")

# A commit slower than this delays every ack waiting on it: worth a warning.
SLOW_COMMIT = 0.5

# At most this many adds per batch: one SQLite transaction of 4,096 rows takes a few
# milliseconds, a Redis script of as many some 40 ms; what arrives meanwhile waits for the
# next round (and, past the flow gate's mark, is not read from the sockets at all).
MAX_BATCH = 4096

# How a refusal is reported: (peer, code, message, id, the input as the client sent it).
Refuse = Callable[[Peer, str, str, "str | None", str], None]


@dataclass(slots=True)
class CommitWindow:
    """Commits since the previous look (for ``server.stats``)."""

    commits: int = 0
    updates: int = 0
    max_batch: int = 0
    max_seconds: float = 0.0


class Batcher:
    def __init__(
        self, engine: Engine, hub: Hub, flow: Flow, refuse: Refuse, tallies: Tallies | None = None
    ) -> None:
        self.engine = engine
        self.tallies = tallies if tallies is not None else Tallies()
        self.hub = hub
        self.flow = flow
        self.refuse = refuse
        self._pending: list[tuple[Peer, Submission]] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        # The last update this node had acknowledged: /healthz's position, since a client
        # holding an ack must find it there even if the broadcast is a moment away.
        self.seq = 0
        self.total = 0
        # Figures for stats: since the start, and since the last take_window().
        self.commits = 0
        self.committed = 0
        self.duplicates = 0
        self.failures = 0
        self._window = CommitWindow()
        self.slow_commit = SLOW_COMMIT
        # One event per batch, not per update, but still: skip building it if unused.
        self._debug = logsetup.enabled_for(logging.DEBUG)

    def start(self, seq: int, total: int) -> None:
        self.seq, self.total = seq, total
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    def add_all(self, submissions: Iterable[tuple[Peer, Submission]]) -> None:
        """Queue adds for the next commit, in order (a connection's read at a time)."""
        pending = self._pending
        waiting = len(pending)
        pending.extend(submissions)
        self.flow.level("commit", len(pending))
        if not waiting:
            # Only the first add since a round took the list: with more, the batcher was
            # already woken, or a round runs and looks at the list again when it ends.
            self._idle.clear()
            self._wakeup.set()

    @property
    def backlog(self) -> int:
        return len(self._pending)

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
                log.critical("batcher.error", exc_info=True)
            if self._pending:
                self._wakeup.set()  # what came during the round, or the rest of a backlog
                # Under load, one loop turn first: the reads already waiting join this
                # batch rather than the one after it. Fewer, larger commits (a commit's
                # fsync, acks and broadcast cost as much for 150 adds as for 200): durable
                # ingest +13 % at the median of 6 pairs (docs/benchmarks.md). An idle
                # batcher woken by an add takes it at once.
                await asyncio.sleep(0)
            else:
                self._idle.set()
            self.flow.level("commit", len(self._pending))

    async def _round(self) -> None:
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        if not batch:
            return
        started = time.perf_counter()
        try:
            results = await self.engine.submit([s for _, s in batch])
        except EngineError as exc:
            self.failures += 1
            for peer, submission in batch:
                self.refuse(peer, exc.code, exc.message, submission.req_id, str(submission.delta))
            return
        self._answer(batch, results, time.perf_counter() - started)

    def _answer(
        self, batch: list[tuple[Peer, Submission]], results: list[Result], seconds: float
    ) -> None:
        send = self.hub.send
        encode_ack = protocol.encode_ack
        debug = self._debug
        # One clock read per batch; the arrival time of each add came with it.
        now = time.time()
        waited: list[float] = []  # the acks' latencies, observed in one call
        observe = waited.append if self.tallies.enabled else None
        applied = 0
        first: Update | None = None
        last: Update | None = None
        for (peer, submission), result in zip(batch, results, strict=True):
            if type(result) is Update:
                applied += 1
                peer.applied += 1
                peer.delta_sum += result.delta
                if first is None:
                    first = result
                last = result
                if result.req_id is not None:
                    send(peer, encode_ack(result.req_id, result.seq, result.total))
                    if observe is not None:
                        observe(now - submission.at)
                if debug:
                    log.debug(
                        "update.applied",
                        **peer.context(),
                        seq=result.seq,
                        delta=result.delta,
                        total=result.total,
                        id=result.req_id,
                    )
            elif type(result) is Duplicate:
                peer.duplicates += 1
                self.duplicates += 1
                send(peer, encode_ack(result.req_id, result.seq, result.total, True))
                if observe is not None:
                    observe(now - submission.at)
                if debug:
                    context = peer.context()
                    log.debug("update.duplicate", **context, id=result.req_id, seq=result.seq)
            else:
                assert isinstance(result, Refused)
                self.refuse(
                    peer, result.code, result.message, submission.req_id, str(submission.delta)
                )
        if waited:
            self.tallies.ack_seconds.observe_all(waited)
        if last is not None and last.seq > self.seq:
            self.seq, self.total = last.seq, last.total
        self.hub.flush_queued()
        self._account(batch, applied, seconds, first, last)

    def _account(
        self,
        batch: list[tuple[Peer, Submission]],
        applied: int,
        seconds: float,
        first: Update | None,
        last: Update | None,
    ) -> None:
        self.commits += 1
        self.committed += applied
        window = self._window
        window.commits += 1
        window.updates += applied
        window.max_batch = max(window.max_batch, len(batch))
        window.max_seconds = max(window.max_seconds, seconds)
        self.tallies.commit_seconds.observe(seconds)
        self.tallies.batch_size.observe(len(batch))
        if seconds >= self.slow_commit:
            level, event = logging.WARNING, "store.commit_slow"
        elif self._debug:
            level, event = logging.DEBUG, "store.committed"
        else:
            return
        log.log(
            level,
            event,
            batch=len(batch),
            ms=round(seconds * 1000, 3),
            first_seq=None if first is None else first.seq,
            last_seq=None if last is None else last.seq,
            pending=len(self._pending),
        )

    def take_window(self) -> CommitWindow:
        """The commit figures since the previous call, and start a new window."""
        window, self._window = self._window, CommitWindow()
        return window

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
