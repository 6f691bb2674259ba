"""One load-generator process: its share of watchers and senders, on one event loop.

The coordinator (:mod:`wstally.loadgen.coordinator`) starts several of these so that the
generator is not the bottleneck, and steps them through phases: connect, go, senders done,
catch up, report. :class:`Worker` runs the phases in that order, one method each.
"""

from __future__ import annotations

import asyncio
import signal
import time
from array import array
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

from wstally.fdlimit import raise_fd_limit
from wstally.loadgen.connect import connect_all, greet_watcher, stall
from wstally.loadgen.histograms import LatencyCounts, new_histogram
from wstally.loadgen.latency import FanoutLatency, fanout_latency
from wstally.loadgen.plan import Plan
from wstally.loadgen.results import NodeShare, WatcherTotals, WorkerFailure, WorkerResult
from wstally.loadgen.sender import Sender, SenderStats
from wstally.loadgen.shared import Counts, Shared
from wstally.loadgen.watcher import Positions, Samples, Watcher
from wstally.loadgen.wire import FrameClient, open_client

__all__ = ["Worker", "run_worker"]

# Watchers per generator process whose deliveries are timed for the fan-out histogram.
LATENCY_WATCHERS = 50
# Descriptors beyond one per connection: stalled readers, the loop, the queue, the logs.
FD_SPARE = 256
CATCH_UP = 30.0  # seconds the watchers get to reach the servers' final seq
REPORT_EVERY = 0.1  # seconds between progress posts
RECONNECT_TIMEOUT = 5.0
RECONNECT_DELAY_MAX = 1.0


def run_worker(plan: Plan, shared: Shared) -> None:
    """Entry point of a worker process: run, then put one result (or failure) on the queue."""
    # Ctrl-C reaches the whole process group: the coordinator alone answers it (and ends
    # the workers), so that one interrupted run prints no traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit(plan.watchers + plan.senders + FD_SPARE)
    result: WorkerResult | WorkerFailure
    try:
        result = _runner()(_work(plan, shared))
    except Exception as exc:  # report, never hang the coordinator
        result = WorkerFailure(plan.index, f"{type(exc).__name__}: {exc}")
    shared.results.put(result)


def _runner() -> Callable[[Coroutine[Any, Any, WorkerResult]], WorkerResult]:
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional
        return asyncio.run


async def _work(plan: Plan, shared: Shared) -> WorkerResult:
    return await Worker(plan, shared).run()


class Timing(NamedTuple):
    send_seconds: float
    run_seconds: float  # from go until every watcher caught up
    cpu_seconds: float  # this process's CPU over run_seconds


class Worker:
    """This process's connections and the phases of one run.

    Connection i is watcher i, or sender i - len(watchers) past the watchers.
    """

    def __init__(self, plan: Plan, shared: Shared) -> None:
        self.plan = plan
        self.shared = shared
        # Round-robin across the targets (the index is the run's, not this process's).
        self.watcher_homes = plan.watcher_homes()
        self.sender_homes = plan.sender_homes()
        self.homes = self.watcher_homes + self.sender_homes  # where each one is now
        # Fan-out latency samples, by the target of the watcher that received them.
        self.samples: list[Samples] = [(array("q"), array("d")) for _ in plan.targets]
        self.positions = Positions()
        self.ack_hist = LatencyCounts()
        self.connect_hist = new_histogram()
        self.watchers = self._new_watchers()
        self.senders = self._new_senders()
        self.conns: list[FrameClient | None] = []
        self.failed = 0
        self.errors: list[str] = []
        self.stalled: list[FrameClient] = []
        self.keepers: list[asyncio.Future[None]] = []
        self.reconnects = 0
        self.closing = False

    def _new_watchers(self) -> list[Watcher]:
        # Fan-out latency is sampled on a subset of watchers (matching every delivery to its
        # send time would cost the generator more than the run itself, 16 M deliveries/s),
        # spread evenly over the connection order: a server writes a broadcast to its
        # connections one after the other, 20 ms from first to last for 1,000 of them here,
        # often in the order they connected. The first 50 alone measured the best places
        # only (docs/benchmarks.md, fourth session).
        count = len(self.watcher_homes)
        timed = min(count, LATENCY_WATCHERS)
        spread = {k * count // timed for k in range(timed)}
        return [
            Watcher(
                self.plan.sample_every, self.samples[u] if i in spread else None, self.positions, u
            )
            for i, u in enumerate(self.watcher_homes)
        ]

    def _new_senders(self) -> list[Sender]:
        plan = self.plan
        senders = [
            Sender(f"w{plan.index}s{i}", plan, self.shared.ring, self.ack_hist)
            for i in range(plan.senders)
        ]
        for sender, u in zip(senders, self.sender_homes, strict=True):
            sender.url = u
        return senders

    def _callback(self, i: int) -> Callable[[bytes], None]:
        n = len(self.watchers)
        return self.watchers[i].on_text if i < n else self.senders[i - n].on_text

    async def run(self) -> WorkerResult:
        await self._connect()
        await self._await_go()
        cpu0, t0 = time.process_time(), time.monotonic()
        reporter = asyncio.ensure_future(self._report())
        await self._send()
        send_seconds = time.monotonic() - t0
        self.shared.arrive(self.shared.senders_done)
        final = await self._catch_up()
        timing = Timing(send_seconds, time.monotonic() - t0, time.process_time() - cpu0)
        reporter.cancel()
        self._post_progress()
        latency = fanout_latency(self.samples, self.shared.ring)
        await self._close()
        return self._result(final, timing, latency)

    # Phase 1: connect, then tell the coordinator this process is ready.

    async def _connect(self) -> None:
        callbacks = [self._callback(i) for i in range(len(self.homes))]
        connected = await connect_all(self.plan, callbacks, self.homes, self.connect_hist)
        self.conns, self.failed, self.errors = connected
        n = len(self.watchers)
        for i, conn in enumerate(self.conns[:n]):
            if conn is not None:
                greet_watcher(self.plan, i, conn)
        for sender, conn in zip(self.senders, self.conns[n:], strict=True):
            if conn is not None:
                sender.attach(conn)
        self.stalled = await stall(self.plan)
        self.keepers = [asyncio.ensure_future(keeper) for keeper in self._keepers()]
        self._post_progress()
        self.shared.arrive(self.shared.ready)

    def _keepers(self) -> list[Coroutine[Any, Any, None]]:
        if self.plan.reconnect:
            return [self._keep(i) for i, conn in enumerate(self.conns) if conn is not None]
        n = len(self.watchers)
        pairs = zip(self.senders, self.conns[n:], strict=True)
        return [_give_up(sender, conn) for sender, conn in pairs if conn is not None]

    async def _keep(self, i: int) -> None:
        # After a server crash and restart, come back: watchers resync from the snapshot,
        # senders resend what was never answered.
        while not self.closing:
            conn = self.conns[i]
            assert conn is not None
            await asyncio.shield(conn.closed)
            await self._reopen(i)

    async def _reopen(self, i: int) -> None:
        # A target that refuses is left for the next one: with several nodes, the clients
        # of a node that died move to another.
        delay = 0.05
        u = self.homes[i]
        while not self.closing:
            host, port = self.plan.targets[u]
            try:
                async with asyncio.timeout(RECONNECT_TIMEOUT):
                    conn = await open_client(host, port, self._callback(i), *self.plan.access())
            except Exception:
                u = (u + 1) % len(self.plan.targets)
                await asyncio.sleep(delay)
                delay = min(RECONNECT_DELAY_MAX, delay * 2)
                continue
            self._reattach(i, conn, u)
            return

    def _reattach(self, i: int, conn: FrameClient, u: int) -> None:
        self.conns[i] = conn
        self.homes[i] = u
        self.reconnects += 1
        n = len(self.watchers)
        if i >= n:
            self.senders[i - n].url = u
            self.senders[i - n].attach(conn)
            return
        watcher = self.watchers[i]
        watcher.url = u
        if watcher.samples is not None:
            watcher.samples = self.samples[u]
        greet_watcher(self.plan, i, conn)

    # Phase 2: go, send, report progress.

    async def _await_go(self) -> None:
        # The coordinator reads the starting position meanwhile. The flag is shared across
        # processes: no asyncio.Event can stand in for it.
        while not self.shared.go.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    async def _send(self) -> None:
        tasks = [asyncio.ensure_future(s.run()) for s in self.senders if s.client is not None]
        if tasks:
            await asyncio.wait(tasks)

    async def _report(self) -> None:
        """Post progress; pass the coordinator's stop on to the senders."""
        while True:
            self._post_progress()
            if self.shared.stop.is_set():
                for sender in self.senders:
                    sender.stop()
            await asyncio.sleep(REPORT_EVERY)

    def _post_progress(self) -> None:
        counts = Counts(
            acked=sum(s.stats.acked for s in self.senders),
            items=sum(w.items for w in self.watchers),
            errors=sum(sum(s.stats.refused.values()) for s in self.senders),
            connected=len(self.conns) - self.failed,
        )
        self.shared.progress.post(self.plan.index, counts)

    # Phase 3: catch up, close, report.

    async def _catch_up(self) -> int:
        """The servers' final seq, once the coordinator knows it, and every watcher there
        (or the time is up: the verdict counts those behind)."""
        while self.shared.final_seq.value < 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        final = self.shared.final_seq.value
        deadline = time.monotonic() + CATCH_UP
        while time.monotonic() < deadline and any(w.last_seq < final for w in self.watchers):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return final

    async def _close(self) -> None:
        self.closing = True
        for keeper in self.keepers:
            keeper.cancel()
        conns = [conn for conn in self.conns if conn is not None]
        for conn in conns:
            conn.close()
        await asyncio.sleep(0.05)  # the close frames leave, then the sockets go
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
        for client in self.stalled:
            if client.transport is not None:
                client.transport.abort()

    def _result(self, final: int, timing: Timing, latency: FanoutLatency) -> WorkerResult:
        return WorkerResult(
            index=self.plan.index,
            connected=len(self.conns) - self.failed,
            connect_failed=self.failed,
            connect_errors=self.errors,
            adds=SenderStats.merge(s.stats for s in self.senders),
            unanswered=sum(len(s.sent_at) for s in self.senders),
            reconnects=self.reconnects,
            stalled=len(self.stalled),
            watched=self._watched(final),
            connect_hist=self.connect_hist.encode(),
            ack_hist=self.ack_hist.histogram().encode(),
            fanout_hist=latency.every.encode(),
            fanout_same_hist=latency.same.encode(),
            fanout_cross_hist=latency.cross.encode(),
            nodes=self._node_shares(latency),
            send_seconds=timing.send_seconds,
            run_seconds=timing.run_seconds,
            cpu_seconds=timing.cpu_seconds,
        )

    def _watched(self, final: int) -> WatcherTotals:
        watchers = self.watchers
        gaps = [gap for w in watchers for gap in w.gaps]
        seen = self.positions.seen
        return WatcherTotals(
            items=sum(w.items for w in watchers),
            snapshots=sum(w.snapshots for w in watchers),
            gaps=len(gaps),
            gap_examples=gaps[:5],
            states=sorted({(w.last_seq, w.last_total) for w in watchers if w.last_seq >= 0}),
            behind=sum(1 for w in watchers if w.last_seq < final),
            position_seqs=array("q", seen.keys()),
            position_totals=array("q", seen.values()),
            position_conflicts=self.positions.conflicts,
            position_examples=self.positions.examples,
        )

    def _node_shares(self, latency: FanoutLatency) -> list[NodeShare]:
        """Per target, by where each connection was first placed."""
        watchers = list(zip(self.watchers, self.watcher_homes, strict=True))
        senders = list(zip(self.senders, self.sender_homes, strict=True))
        return [
            NodeShare(
                watchers=self.watcher_homes.count(u),
                senders=self.sender_homes.count(u),
                items=sum(w.items for w, home in watchers if home == u),
                acked=sum(s.stats.acked for s, home in senders if home == u),
                fanout_hist=latency.by_target[u].encode(),
            )
            for u in range(len(self.plan.targets))
        ]


async def _give_up(sender: Sender, conn: FrameClient) -> None:
    # Without --reconnect a lost sender is done: its unanswered adds are reported.
    await asyncio.shield(conn.closed)
    sender.finished.set()
