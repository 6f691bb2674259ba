"""What the coordinator and its worker processes share while a run is under way.

Each structure names its cells, so that neither side of the process boundary indexes a flat
array by hand: the worker posts its :class:`Counts`, the coordinator reads their sum.
"""

from __future__ import annotations

import ctypes
from dataclasses import astuple, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.context import SpawnContext
    from multiprocessing.queues import Queue
    from multiprocessing.sharedctypes import Synchronized
    from multiprocessing.synchronize import Event

__all__ = ["Counts", "Progress", "SendRing", "Shared"]

# Sampled seqs whose send time is kept: a slot is reused this many samples later, long
# after every watcher has received the seq it held.
RING = 1 << 20


@dataclass(frozen=True)
class Counts:
    """One worker's running counts, shown on the live progress line."""

    acked: int = 0
    items: int = 0  # updates delivered to its watchers
    errors: int = 0  # adds refused
    connected: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


_WIDTH = len(fields(Counts))


class Progress:
    """A row of :class:`Counts` per worker, in shared memory; each worker writes its own."""

    def __init__(self, cells: ctypes.Array[ctypes.c_longlong]) -> None:
        self.cells = cells

    @classmethod
    def allocate(cls, ctx: SpawnContext, workers: int) -> Progress:
        return cls(ctx.RawArray(ctypes.c_longlong, _WIDTH * workers))

    def post(self, worker: int, counts: Counts) -> None:
        start = worker * _WIDTH
        self.cells[start : start + _WIDTH] = list(astuple(counts))

    def total(self) -> Counts:
        rows = range(0, len(self.cells), _WIDTH)
        return sum((Counts(*self.cells[i : i + _WIDTH]) for i in rows), Counts())


class SendRing:
    """When the add of each sampled seq was sent, and to which target, keyed by seq.

    A sender writes it on the ack (only then is the seq known); the process of any watcher
    reads it back to time the fan-out: watchers and senders may live in different workers.
    """

    def __init__(
        self,
        times: ctypes.Array[ctypes.c_double],
        targets: ctypes.Array[ctypes.c_short],
        every: int,
    ) -> None:
        self.times = times
        self.targets = targets
        self.every = every  # fan-out latency is measured on every Nth seq

    @classmethod
    def allocate(cls, ctx: SpawnContext, every: int) -> SendRing:
        times = ctx.RawArray(ctypes.c_double, RING)
        return cls(times, ctx.RawArray(ctypes.c_short, RING), every)

    def _slot(self, seq: int) -> int:
        return (seq // self.every) % RING

    def record(self, seq: int, sent: float, target: int) -> None:
        """``seq``'s add, sent at ``sent`` to target ``target``; ignored unless sampled."""
        if seq % self.every == 0:
            slot = self._slot(seq)
            self.times[slot] = sent
            self.targets[slot] = target

    def lookup(self, seq: int) -> tuple[float, int]:
        """(send time, target) of a sampled seq; a send time of 0 when never recorded."""
        slot = self._slot(seq)
        return self.times[slot], self.targets[slot]


@dataclass
class Shared:
    """The multiprocessing objects of one run: phases, progress, send times, results."""

    ready: Synchronized[int]  # workers connected and waiting for go
    go: Event  # the coordinator read the starting position: send
    stop: Event  # stop sending now (duration elapsed)
    senders_done: Synchronized[int]  # workers whose senders finished
    final_seq: Synchronized[int]  # the servers' final seq, -1 until known
    progress: Progress
    ring: SendRing
    results: Queue[Any]  # one WorkerResult or WorkerFailure per worker

    @classmethod
    def allocate(cls, ctx: SpawnContext, workers: int, sample_every: int) -> Shared:
        return cls(
            ready=ctx.Value("i", 0),
            go=ctx.Event(),
            stop=ctx.Event(),
            senders_done=ctx.Value("i", 0),
            final_seq=ctx.Value("q", -1),
            progress=Progress.allocate(ctx, workers),
            ring=SendRing.allocate(ctx, sample_every),
            results=ctx.Queue(),
        )

    def arrive(self, counter: Synchronized[int]) -> None:
        """One more worker at this phase (``ready`` or ``senders_done``)."""
        with counter.get_lock():
            counter.value += 1
