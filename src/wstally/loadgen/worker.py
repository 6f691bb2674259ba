"""One load-generator process: its share of watchers and senders, on one event loop.

The coordinator (scripts/loadtest.py) starts several of these so that the generator is not
the bottleneck, and steps them through phases: connect, go, senders done, catch up, report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import resource
import signal
import ssl
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from wstally.client.pacing import Pacer
from wstally.loadgen.wire import FrameClient, open_client

__all__ = ["Plan", "Positions", "Shared", "new_histogram", "run_worker"]

_UPDATES = b'{"type":"updates","seq":'
_PRESENCE = b'{"type":"presence"'

# Watchers per generator process whose deliveries are timed for the fan-out histogram.
LATENCY_WATCHERS = 50

# Refusals after which an add is sent again, same id: nothing was applied (rate_limited), or
# the outcome is unknown and the id makes a resend safe (unavailable: the shared engine,
# Redis, could not be reached).
RESENT_CODES = frozenset({"rate_limited", "unavailable"})
RETRY_FIRST = 0.05  # seconds before resending an add refused as unavailable; doubles ...
RETRY_MAX = 1.0  # ... up to this, until an add is acked again

# Latencies are recorded in microseconds, from 1 µs to 10 minutes, 3 significant digits.
HIST_MAX_US = 600_000_000


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, HIST_MAX_US, 3)


@dataclass
class Plan:
    index: int
    host: str
    port: int
    watchers: int
    senders: int
    window: int = 50
    rate: float | None = None  # adds per second per sender; None: as fast as acks allow
    duration: float | None = 10.0
    updates: int | None = None  # per sender
    stalled: int = 0  # connections that stop reading after their snapshot
    ramp: float = 0.0
    sample_every: int = 8  # fan-out latency is measured on every Nth seq
    connect_timeout: float = 30.0
    reconnect: bool = False  # survive a server restart: reconnect, resend unacked adds
    tls: bool = False  # wss://
    cafile: str | None = None
    token: str | None = None
    run_id: str = ""  # makes hello client ids unique to this run
    # Several servers (nodes of one tally): watcher k, sender k and stalled reader k of the
    # whole run go to targets[k % len(targets)]; the offsets are this process's first k.
    targets: tuple[tuple[str, int], ...] = ()  # () means ((host, port),)
    # ... or round-robin over these indices into targets only (() means all of them).
    watch_on: tuple[int, ...] = ()
    send_on: tuple[int, ...] = ()
    watcher_offset: int = 0
    sender_offset: int = 0
    stalled_offset: int = 0


def _targets(plan: Plan) -> tuple[tuple[str, int], ...]:
    return plan.targets or ((plan.host, plan.port),)


def _homes(plan: Plan, on: tuple[int, ...], offset: int, count: int) -> list[int]:
    """Target index of each of ``count`` connections: round-robin over ``on`` (or all)."""
    on = on or tuple(range(len(_targets(plan))))
    return [on[(offset + i) % len(on)] for i in range(count)]


@dataclass
class Shared:
    """What the coordinator and the workers exchange while running (multiprocessing objects)."""

    ready: Any  # Barrier-like: Event per worker is simpler: a Value counter
    go: Any  # Event
    stop: Any  # Event: stop sending now (duration elapsed or interrupt)
    senders_done: Any  # Value('i'): workers whose senders finished
    final_seq: Any  # Value('q'): -1 until known
    progress: Any  # RawArray('q', 4 * workers): acked, items, errors, connected
    send_times: Any  # RawArray('d', ring): send time of sampled seqs
    results: Any  # Queue
    send_urls: Any = None  # RawArray('b', ring): target index of the sender of sampled seqs


class Positions:
    """The (seq, total) pairs this process's watchers saw, each at the end of a frame.

    Two watchers (on one node or on two) that saw the same updates in another order, or
    another update under one seq, disagree on the total after some seq: the coordinator
    merges every process's pairs with the totals of the acks and counts disagreements.
    """

    __slots__ = ("conflicts", "examples", "seen")

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}
        self.conflicts = 0
        self.examples: list[tuple[int, int, int]] = []

    def conflict(self, seq: int, total: int) -> None:
        self.conflicts += 1
        if len(self.examples) < 5:
            self.examples.append((seq, self.seen[seq], total))


class Watcher:
    """Checks continuity and counts deliveries from frame headers alone."""

    __slots__ = (
        "frames",
        "gaps",
        "items",
        "last_seq",
        "last_total",
        "positions",
        "sample",
        "snapshots",
        "t",
        "url",
    )

    def __init__(
        self,
        sample_every: int,
        samples: tuple[array[int], array[float]] | None,
        positions: Positions | None = None,
        url: int = 0,
    ):
        self.positions = positions if positions is not None else Positions()
        self.url = url  # index of the target it is connected to
        self.last_seq = -1
        self.last_total = 0
        self.items = 0
        self.frames = 0
        self.gaps: list[tuple[int, int]] = []
        self.snapshots = 0
        self.sample = sample_every
        self.t = samples

    def on_text(self, p: bytes) -> None:
        if not p.startswith(_UPDATES):
            if not p.startswith(_PRESENCE):
                self._slow_path(json.loads(p))
            return
        # wstally's compact encoding puts both seqs at fixed places: no JSON parse needed.
        j = p.index(b",", 24)
        top = int(p[24:j])
        k = p.index(b",", j + 9)
        m = k + 17
        self._updates(int(p[m : p.index(b",", m)]), top, int(p[j + 9 : k]))

    def _slow_path(self, msg: dict[str, Any]) -> None:
        # Other servers (the naive reference) may space their JSON differently.
        kind = msg.get("type")
        if kind == "updates":
            self._updates(msg["items"][0]["seq"], msg["seq"], msg["total"])
        elif kind == "snapshot":
            self.last_seq = msg["seq"]
            self.last_total = msg["total"]
            self.snapshots += 1
            self._position(self.last_seq, self.last_total)

    def _position(self, seq: int, total: int) -> None:
        positions = self.positions
        if positions.seen.setdefault(seq, total) != total:
            positions.conflict(seq, total)

    def _updates(self, first: int, top: int, total: int) -> None:
        if first != self.last_seq + 1:
            self.gaps.append((self.last_seq, first))
        self.items += top - first + 1
        self.frames += 1
        self.last_seq = top
        self.last_total = total
        positions = self.positions
        if positions.seen.setdefault(top, total) != total:
            positions.conflict(top, total)
        samples = self.t
        if samples is not None:
            k = self.sample
            s = first + (-first % k)
            if s <= top:
                now = time.monotonic()
                seqs, times = samples
                while s <= top:
                    seqs.append(s)
                    times.append(now)
                    s += k


@dataclass
class SenderStats:
    sent: int = 0
    acked: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    resent: int = 0
    rate_limited: int = 0  # refusals as too many per second: each add was sent again
    unavailable: int = 0  # refusals as unavailable (engine unreachable): sent again, same id
    delta_sum: int = 0
    seqs: array[int] = field(default_factory=lambda: array("q"))
    totals: array[int] = field(default_factory=lambda: array("q"))  # the total of each ack


class Sender:
    """Sends adds with ids, pipelined (bounded window) or paced (fixed rate).

    Every add leaves through :meth:`_pump`, at the pace the server accepts: an add refused
    as ``rate_limited`` was not applied, so it is sent again, same id, first in line, and
    the :class:`Pacer` slows the sender down, as ``wstally client`` does. An add refused as
    ``unavailable`` (the shared engine could not be reached) is sent again, same id, after a
    growing delay: its outcome may be unknown, and the id makes the resend count once.
    """

    def __init__(self, name: str, plan: Plan, shared: Shared, ack_hist: HdrHistogram) -> None:
        self.name = name
        self.plan = plan
        self.shared = shared
        self.ack_hist = ack_hist
        self.client: FrameClient | None = None
        self.stats = SenderStats()
        self.sent_at: dict[int, float] = {}  # intended send time of every unanswered add
        self.last_sent: dict[int, float] = {}  # when it actually left, last time
        self.deltas: dict[int, int] = {}
        self.next_n = 0
        self.finished = asyncio.Event()
        self.stopping = False
        self.rng = random.Random(hash(name))
        self.pacer = Pacer()
        self._due: deque[int] = deque()  # decided, not yet sent
        self._retry: deque[int] = deque()  # refused as rate_limited: sent again first
        self._pump_handle: asyncio.Handle | None = None
        self.ring = len(shared.send_times)
        self.resent: set[int] = set()
        self.url = 0  # index of the target it is connected to
        self._backoff = RETRY_FIRST

    def attach(self, client: FrameClient) -> None:
        """Use ``client``: say hello, and resend every add still unanswered, same ids.

        The hello's client id scopes the ids, so a resend after a server restart is
        recognised as a duplicate if the first attempt had been committed.
        """
        reattach = self.client is not None
        self.client = client
        hello = b'{"type":"hello","client":"%s-%s"}' % (
            self.plan.run_id.encode(),
            self.name.encode(),
        )
        client.send(hello)
        if reattach:
            self._retry.clear()
            self._due = deque(sorted(self.sent_at))
            self.resent.update(self._due)
            self.stats.resent += len(self._due)
        self._schedule_pump()

    def _frame(self, n: int) -> bytes:
        return b'{"type":"add","delta":%d,"id":"%s-%d"}' % (self.deltas[n], self.name.encode(), n)

    def limit_reached(self) -> bool:
        limit = self.plan.updates
        return self.stopping or (limit is not None and self.next_n >= limit)

    def send_next(self, intended: float | None = None) -> None:
        n = self.next_n
        self.next_n += 1
        self.deltas[n] = self.rng.randint(-1000, 1000)
        self.sent_at[n] = intended if intended is not None else time.monotonic()
        self.stats.sent += 1
        self._due.append(n)
        self._schedule_pump()

    def _schedule_pump(self) -> None:
        # Every add decided in this tick leaves in one write.
        if self._pump_handle is None:
            self._pump_handle = asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_handle = None
        if self.client is None:
            return
        now = time.monotonic()
        frames: list[bytes] = []
        while self._retry or self._due:
            wait = self.pacer.delay(now)
            if wait > 0:
                loop = asyncio.get_running_loop()
                self._pump_handle = loop.call_later(wait, self._pump)
                break
            n = (self._retry or self._due).popleft()
            if n in self.sent_at:  # else answered meanwhile
                self.pacer.sent(now)
                self.last_sent[n] = now
                frames.append(self._frame(n))
        if frames:
            self.client.send_many(frames)

    def on_text(self, p: bytes) -> None:
        if p.startswith(_UPDATES) or p.startswith(_PRESENCE):
            return
        msg = json.loads(p)
        kind = msg.get("type")
        if kind == "ack":
            self._ack(msg)
        elif kind == "error":
            self._error(msg)

    def _ack(self, ack: dict[str, Any]) -> None:
        now = time.monotonic()
        n = int(ack["id"].rpartition("-")[2])
        sent = self.sent_at.pop(n, None)
        if sent is None:
            return
        self.last_sent.pop(n, None)
        stats = self.stats
        if ack.get("duplicate") and n not in self.resent:
            stats.duplicates += 1
        stats.acked += 1
        seq = ack["seq"]
        stats.seqs.append(seq)
        stats.totals.append(ack["total"])
        stats.delta_sum += self.deltas.pop(n)
        self.ack_hist.record_value(max(1, int((now - sent) * 1e6)))
        self._backoff = RETRY_FIRST
        k = self.plan.sample_every
        if seq % k == 0:
            slot = (seq // k) % self.ring
            self.shared.send_times[slot] = sent
            if self.shared.send_urls is not None:
                self.shared.send_urls[slot] = self.url
        self._after_answer()

    def _error(self, err: dict[str, Any]) -> None:
        code = err.get("code", "?")
        req = err.get("id")
        n = int(req.rpartition("-")[2]) if isinstance(req, str) else None
        if code in RESENT_CODES and n in self.sent_at:
            if code == "rate_limited":
                self._slow_down(n)
            else:
                self._resend_later(n)
            return
        self.stats.refused[code] = self.stats.refused.get(code, 0) + 1
        if n is not None:
            self.sent_at.pop(n, None)
            self.last_sent.pop(n, None)
            self.deltas.pop(n, None)
        self._after_answer()

    def _slow_down(self, n: int) -> None:
        now = time.monotonic()
        self.stats.rate_limited += 1
        self.pacer.refused(self.last_sent.get(n, now), now)
        self._retry.append(n)
        self._schedule_pump()

    def _resend_later(self, n: int) -> None:
        self.stats.unavailable += 1
        # The first attempt may have been applied after all: a duplicate ack is then right.
        self.resent.add(n)
        delay, self._backoff = self._backoff, min(RETRY_MAX, self._backoff * 2)
        asyncio.get_running_loop().call_later(delay, self._requeue, n)

    def _requeue(self, n: int) -> None:
        if n in self.sent_at:  # else answered meanwhile (a reconnect resent it)
            self._retry.append(n)
            self._schedule_pump()

    def _after_answer(self) -> None:
        if self.plan.rate is None:
            while not self.limit_reached() and len(self.sent_at) < self.plan.window:
                self.send_next()
        if self.limit_reached() and not self.sent_at:
            self.finished.set()

    async def run(self) -> None:
        if self.plan.rate is None:
            self._after_answer()
        else:
            await self._paced(self.plan.rate)
        if self.limit_reached() and not self.sent_at:
            self.finished.set()
        await self.finished.wait()

    async def _paced(self, rate: float) -> None:
        # Latency is measured from the intended send time, so a server that falls behind
        # (or a rate limit that holds adds back) cannot hide it (coordinated omission).
        start = time.monotonic()
        interval = 1.0 / rate
        while not self.limit_reached():
            due = start + self.next_n * interval
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(min(due - now, 0.005))
                continue
            while not self.limit_reached() and start + self.next_n * interval <= now:
                self.send_next(start + self.next_n * interval)
            await asyncio.sleep(0)


def _greet_watcher(plan: Plan, index: int, conn: FrameClient) -> None:
    # The server holds a new connection's snapshot until its hello (or 50 ms): say it.
    conn.send(b'{"type":"hello","client":"%s-w%d-%d"}' % (plan.run_id.encode(), plan.index, index))


async def _stall(plan: Plan) -> list[FrameClient]:
    """Connections that read their snapshot and then nothing: the slow-consumer probe."""
    stalled: list[FrameClient] = []
    targets = _targets(plan)
    for u in _homes(plan, plan.watch_on, plan.stalled_offset, plan.stalled):
        holder: list[FrameClient] = []
        host, port = targets[u]

        def stop_reading(_payload: bytes, holder: list[FrameClient] = holder) -> None:
            if holder and holder[0].transport is not None:
                holder[0].transport.pause_reading()

        async with asyncio.timeout(plan.connect_timeout):
            client = await open_client(host, port, stop_reading, *_access(plan))
        holder.append(client)
        stalled.append(client)
    return stalled


def _access(plan: Plan) -> tuple[ssl.SSLContext | None, str | None]:
    tls = ssl.create_default_context(cafile=plan.cafile) if plan.tls else None
    return tls, plan.token


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(wanted, soft)), hard))


def run_worker(plan: Plan, shared: Shared) -> None:
    """Entry point of a worker process."""
    # Ctrl-C reaches the whole process group: the coordinator alone answers it (and ends
    # the workers), so that one interrupted run prints no traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _raise_fd_limit(plan.watchers + plan.senders + 256)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional
        runner = asyncio.run
    try:
        result = runner(_main(plan, shared))
    except Exception as exc:  # report, never hang the coordinator
        result = {"index": plan.index, "fatal": f"{type(exc).__name__}: {exc}"}
    shared.results.put(result)


async def _connect_all(
    plan: Plan, callbacks: list[Any], urls: list[int], hist: HdrHistogram
) -> tuple[list[FrameClient | None], int, list[str]]:
    """Connection i with callbacks[i] to target urls[i]."""
    sem = asyncio.Semaphore(200)
    errors: list[str] = []
    ramp_step = plan.ramp / max(1, len(callbacks))

    targets = _targets(plan)

    async def one(i: int, cb: Any) -> FrameClient | None:
        host, port = targets[urls[i]]
        if ramp_step:
            await asyncio.sleep(i * ramp_step)
        async with sem:
            started = time.monotonic()
            try:
                async with asyncio.timeout(plan.connect_timeout):
                    client = await open_client(host, port, cb, *_access(plan))
            except (OSError, TimeoutError, Exception) as exc:
                if len(errors) < 5:
                    errors.append(f"{type(exc).__name__}: {exc}")
                return None
            hist.record_value(max(1, int((time.monotonic() - started) * 1e6)))
            return client

    clients = await asyncio.gather(*(one(i, cb) for i, cb in enumerate(callbacks)))
    failed = sum(1 for c in clients if c is None)
    return list(clients), failed, errors


async def _main(plan: Plan, shared: Shared) -> dict[str, Any]:
    base = plan.index * 4
    progress = shared.progress
    targets = _targets(plan)
    n_targets = len(targets)
    # Fan-out latency samples, by the target of the watcher that received them.
    samples = [(array("q"), array("d")) for _ in targets]
    positions = Positions()
    # Round-robin across the targets, for watchers and senders alike (the index is the run's).
    homes = _homes(plan, plan.watch_on, plan.watcher_offset, plan.watchers)
    sender_homes = _homes(plan, plan.send_on, plan.sender_offset, plan.senders)
    # Fan-out latency is sampled on a subset of watchers: they all receive the same frames
    # at about the same time, and matching every delivery to its send time would cost the
    # generator more than the run itself (16 M deliveries/s).
    watchers = [
        Watcher(plan.sample_every, samples[u] if i < LATENCY_WATCHERS else None, positions, u)
        for i, u in enumerate(homes)
    ]
    ack_hist = new_histogram()
    senders = [Sender(f"w{plan.index}s{i}", plan, shared, ack_hist) for i in range(plan.senders)]
    for sender, u in zip(senders, sender_homes, strict=True):
        sender.url = u
    conn_urls = homes + sender_homes
    connect_hist = new_histogram()
    cpu0 = time.process_time()
    t0 = time.monotonic()
    conns, failed, errors = await _connect_all(
        plan, [w.on_text for w in watchers] + [s.on_text for s in senders], conn_urls, connect_hist
    )
    connect_seconds = time.monotonic() - t0
    for i, conn in enumerate(conns[: plan.watchers]):
        if conn is not None:
            _greet_watcher(plan, i, conn)
    for sender, conn in zip(senders, conns[plan.watchers :], strict=True):
        if conn is not None:
            sender.attach(conn)
    callbacks = [w.on_text for w in watchers] + [s.on_text for s in senders]
    stalled = await _stall(plan)
    closing = [False]
    reconnects = [0]

    async def keep(i: int) -> None:
        # After a server crash and restart, come back: watchers resync from the snapshot,
        # senders resend what was never answered. A target that refuses is left for the
        # next one: with several nodes, the clients of a node that died move to another.
        while True:
            conn = conns[i]
            assert conn is not None
            await asyncio.shield(conn.closed)
            delay = 0.05
            u = conn_urls[i]
            while not closing[0]:
                host, port = targets[u]
                try:
                    async with asyncio.timeout(5):
                        conn = await open_client(host, port, callbacks[i], *_access(plan))
                except Exception:
                    u = (u + 1) % n_targets
                    await asyncio.sleep(delay)
                    delay = min(1.0, delay * 2)
                    continue
                conns[i] = conn
                conn_urls[i] = u
                reconnects[0] += 1
                if i >= plan.watchers:
                    senders[i - plan.watchers].url = u
                    senders[i - plan.watchers].attach(conn)
                else:
                    watcher = watchers[i]
                    watcher.url = u
                    if watcher.t is not None:
                        watcher.t = samples[u]
                    _greet_watcher(plan, i, conn)
                break
            if closing[0]:
                return

    async def give_up(sender: Sender, conn: FrameClient) -> None:
        # Without --reconnect a lost sender is done: its unanswered adds are reported.
        await asyncio.shield(conn.closed)
        sender.finished.set()

    if plan.reconnect:
        keepers = [asyncio.ensure_future(keep(i)) for i, c in enumerate(conns) if c is not None]
    else:
        keepers = [
            asyncio.ensure_future(give_up(sender, conn))
            for sender, conn in zip(senders, conns[plan.watchers :], strict=True)
            if conn is not None
        ]
    progress[base + 3] = len(conns) - failed
    with shared.ready.get_lock():
        shared.ready.value += 1
    # Wait for the coordinator's go (it reads the starting total meanwhile).
    # The flags are shared across processes: no asyncio.Event can stand in for them.
    while not shared.go.is_set():  # noqa: ASYNC110
        await asyncio.sleep(0.01)

    cpu_run0 = time.process_time()
    run0 = time.monotonic()
    live = [s for s in senders if s.client is not None]
    tasks = [asyncio.ensure_future(s.run()) for s in live]

    async def report() -> None:
        while True:
            progress[base] = sum(s.stats.acked for s in senders)
            progress[base + 1] = sum(w.items for w in watchers)
            progress[base + 2] = sum(sum(s.stats.refused.values()) for s in senders)
            if shared.stop.is_set():
                for s in senders:
                    s.stopping = True
                    if not s.sent_at:
                        s.finished.set()
            await asyncio.sleep(0.1)

    reporter = asyncio.ensure_future(report())
    if tasks:
        await asyncio.wait(tasks)
    send_seconds = time.monotonic() - run0
    with shared.senders_done.get_lock():
        shared.senders_done.value += 1
    # Catch up: every watcher must reach the server's final seq.
    while shared.final_seq.value < 0:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    final = shared.final_seq.value
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and any(w.last_seq < final for w in watchers):  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    run_seconds = time.monotonic() - run0
    cpu_run = time.process_time() - cpu_run0
    reporter.cancel()
    progress[base + 1] = sum(w.items for w in watchers)

    fanout = new_histogram()
    by_url = [new_histogram() for _ in targets]
    # With several nodes: the sender's node is the watcher's (same) or another (cross).
    same, cross = new_histogram(), new_histogram()
    ring = len(shared.send_times)
    k = plan.sample_every
    send_times = shared.send_times
    send_urls = shared.send_urls if n_targets > 1 else None
    unmatched = 0
    for u, (seqs, times) in enumerate(samples):
        for seq, t in zip(seqs, times, strict=True):
            slot = (seq // k) % ring
            sent = send_times[slot]
            if sent <= 0 or sent > t:
                unmatched += 1
                continue
            micros = max(1, int((t - sent) * 1e6))
            fanout.record_value(micros)
            by_url[u].record_value(micros)
            if send_urls is not None:
                (same if send_urls[slot] == u else cross).record_value(micros)

    closing[0] = True
    for keeper in keepers:
        keeper.cancel()
    for conn in conns:
        if conn is not None:
            conn.close()
    await asyncio.sleep(0.05)
    for conn in conns:
        if conn is not None and conn.transport is not None:
            conn.transport.close()
    for client in stalled:
        if client.transport is not None:
            client.transport.abort()

    watcher_states = {(w.last_seq, w.last_total) for w in watchers if w.last_seq >= 0}
    return {
        "index": plan.index,
        "connected": len(conns) - failed,
        "connect_failed": failed,
        "connect_errors": errors,
        "connect_seconds": connect_seconds,
        "connect_hist": connect_hist.encode(),
        "ack_hist": ack_hist.encode(),
        "fanout_hist": fanout.encode(),
        "fanout_unmatched": unmatched,
        "sent": sum(s.stats.sent for s in senders),
        "acked": sum(s.stats.acked for s in senders),
        "unanswered": sum(len(s.sent_at) for s in senders),
        "duplicates": sum(s.stats.duplicates for s in senders),
        "resent": sum(s.stats.resent for s in senders),
        "rate_limited": sum(s.stats.rate_limited for s in senders),
        "unavailable": sum(s.stats.unavailable for s in senders),
        "reconnects": reconnects[0],
        "refused": _merge_counts(s.stats.refused for s in senders),
        "delta_sum": sum(s.stats.delta_sum for s in senders),
        "acked_seqs": array("q", [q for s in senders for q in s.stats.seqs]).tobytes(),
        "acked_totals": array("q", [t for s in senders for t in s.stats.totals]).tobytes(),
        "position_seqs": array("q", positions.seen.keys()).tobytes(),
        "position_totals": array("q", positions.seen.values()).tobytes(),
        "position_conflicts": positions.conflicts,
        "position_examples": positions.examples,
        "fanout_same_hist": same.encode(),
        "fanout_cross_hist": cross.encode(),
        "per_url": [
            {
                "watchers": sum(1 for h in homes if h == u),
                "senders": sum(1 for h in sender_homes if h == u),
                "items": sum(w.items for w, h in zip(watchers, homes, strict=True) if h == u),
                "acked": sum(
                    s.stats.acked for s, h in zip(senders, sender_homes, strict=True) if h == u
                ),
                "fanout_hist": by_url[u].encode(),
            }
            for u in range(n_targets)
        ],
        "items": sum(w.items for w in watchers),
        "frames": sum(w.frames for w in watchers),
        "snapshots": sum(w.snapshots for w in watchers),
        "gaps": sum(len(w.gaps) for w in watchers),
        "gap_examples": [g for w in watchers for g in w.gaps][:5],
        "watcher_states": sorted(watcher_states),
        "stalled": len(stalled),
        "watchers_behind": sum(1 for w in watchers if w.last_seq < final),
        "send_seconds": send_seconds,
        "run_seconds": run_seconds,
        "cpu_seconds": cpu_run,
        "cpu_total": time.process_time() - cpu0,
    }


def _merge_counts(dicts: Any) -> dict[str, int]:
    merged: dict[str, int] = {}
    for d in dicts:
        for key, value in d.items():
            merged[key] = merged.get(key, 0) + value
    return merged
