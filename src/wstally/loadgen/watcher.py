"""A watcher: a receive-only connection that checks what it is sent, from frame headers.

Each watcher counts deliveries, checks that every seq follows the one before (a gap not
covered by a snapshot is a lost update) and notes the total after the last seq of each
frame; a few of them also note when each sampled seq arrived, for the fan-out latency.
"""

from __future__ import annotations

import json
import time
from array import array
from typing import Any, TypeAlias

from wstally.loadgen.wire import PRESENCE_PREFIX, UPDATES_PREFIX

__all__ = ["Positions", "Samples", "Watcher"]

# Arrival times of sampled seqs: (seqs, monotonic times), appended side by side.
# (array is subscriptable for the type checker only, in Python 3.11.)
Samples: TypeAlias = "tuple[array[int], array[float]]"


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
        "sample_every",
        "samples",
        "snapshots",
        "url",
    )

    def __init__(
        self,
        sample_every: int,
        samples: Samples | None,
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
        self.sample_every = sample_every
        self.samples = samples

    def on_text(self, p: bytes) -> None:
        if not p.startswith(UPDATES_PREFIX):
            if not p.startswith(PRESENCE_PREFIX):
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
        samples = self.samples
        if samples is not None:
            k = self.sample_every
            s = first + (-first % k)
            if s <= top:
                now = time.monotonic()
                seqs, times = samples
                while s <= top:
                    seqs.append(s)
                    times.append(now)
                    s += k
