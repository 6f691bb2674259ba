"""A sender: a connection that sends adds with ids and checks every answer.

Pipelined (a bounded window of adds in flight) or paced (a fixed rate, timed from the
intended send time); refusals that leave nothing applied are sent again, same id.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from array import array
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from wstally.client.pacing import Pacer
from wstally.loadgen.histograms import LatencyCounts
from wstally.loadgen.plan import Plan
from wstally.loadgen.shared import SendRing
from wstally.loadgen.wire import PRESENCE_PREFIX, UPDATES_PREFIX, FrameClient

__all__ = ["RESENT_CODES", "Sender", "SenderStats"]

# An ack exactly as wstally encodes it (protocol.encode_ack), ids being this generator's own
# "<sender>-<n>"; anything else (another server's spacing or field order) goes to json.loads.
ACK = re.compile(
    rb'\{"type":"ack","id":"[^"\\]*-(\d+)","seq":(\d+),"total":(-?\d+)(,"duplicate":true)?\}\Z'
)

# Refusals after which an add is sent again, same id: nothing was applied (rate_limited), or
# the outcome is unknown and the id makes a resend safe (unavailable: the shared engine,
# Redis, could not be reached).
RESENT_CODES = frozenset({"rate_limited", "unavailable"})
RETRY_FIRST = 0.05  # seconds before resending an add refused as unavailable; doubles ...
RETRY_MAX = 1.0  # ... up to this, until an add is acked again


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

    @classmethod
    def merge(cls, many: Iterable[SenderStats]) -> SenderStats:
        """The stats of several senders (or of several workers' senders), summed."""
        merged = cls()
        for stats in many:
            merged.sent += stats.sent
            merged.acked += stats.acked
            for code, count in stats.refused.items():
                merged.refused[code] = merged.refused.get(code, 0) + count
            merged.duplicates += stats.duplicates
            merged.resent += stats.resent
            merged.rate_limited += stats.rate_limited
            merged.unavailable += stats.unavailable
            merged.delta_sum += stats.delta_sum
            merged.seqs.extend(stats.seqs)
            merged.totals.extend(stats.totals)
        return merged


class Sender:
    """Sends adds with ids, pipelined (bounded window) or paced (fixed rate).

    Every add leaves through :meth:`_pump`, at the pace the server accepts: an add refused
    as ``rate_limited`` was not applied, so it is sent again, same id, first in line, and
    the :class:`Pacer` slows the sender down, as ``wstally client`` does. An add refused as
    ``unavailable`` (the shared engine could not be reached) is sent again, same id, after a
    growing delay: its outcome may be unknown, and the id makes the resend count once.
    """

    def __init__(self, name: str, plan: Plan, ring: SendRing, ack_hist: LatencyCounts) -> None:
        self.name = name
        self.plan = plan
        self.ring = ring  # where the send times of sampled seqs go, for the fan-out
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

    def stop(self) -> None:
        """Send nothing more: finish once every add in flight is answered."""
        self.stopping = True
        if not self.sent_at:
            self.finished.set()

    def limit_reached(self) -> bool:
        limit = self.plan.updates
        return self.stopping or (limit is not None and self.next_n >= limit)

    def send_next(self, intended: float | None = None) -> None:
        n = self.next_n
        self.next_n += 1
        # randint's Python layers were 3 % of the generator's core: the same range, cheaper.
        self.deltas[n] = int(self.rng.random() * 2001) - 1000
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
        if p.startswith(UPDATES_PREFIX) or p.startswith(PRESENCE_PREFIX):
            return
        plain = ACK.match(p)
        if plain is not None:
            # wstally's own ack, field for field: json.loads was a quarter of the core.
            self._ack(int(plain[1]), int(plain[2]), int(plain[3]), plain[4] is not None)
            return
        msg = json.loads(p)
        kind = msg.get("type")
        if kind == "ack":
            n = int(msg["id"].rpartition("-")[2])
            self._ack(n, msg["seq"], msg["total"], bool(msg.get("duplicate")))
        elif kind == "error":
            self._error(msg)

    def _ack(self, n: int, seq: int, total: int, duplicate: bool) -> None:
        now = time.monotonic()
        sent = self.sent_at.pop(n, None)
        if sent is None:
            return
        self.last_sent.pop(n, None)
        stats = self.stats
        if duplicate and n not in self.resent:
            stats.duplicates += 1
        stats.acked += 1
        stats.seqs.append(seq)
        stats.totals.append(total)
        stats.delta_sum += self.deltas.pop(n)
        self.ack_hist.record(now - sent)
        self._backoff = RETRY_FIRST
        self.ring.record(seq, sent, self.url)
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
