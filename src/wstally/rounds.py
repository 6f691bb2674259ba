"""A broadcast being written: a slice of its connections per event-loop turn.

A broadcast of updates to a thousand sockets takes 5-20 ms of writes. Written in one go,
it holds up everything else the loop has to do: reading adds, taking finished commits,
sending acks, which then wait behind it once or twice each. Written 0.3 ms at a time,
with a loop turn between slices, they go out in between. At most one broadcast is in
progress: the next one waits for its end, and what cannot wait (shutdown, a new history)
calls ``finish``, which writes the rest of it at once. What each connection is written is
the hub's choice (``Hub.visit``), made when its turn comes, not when the round starts.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from wstally import fanout, logsetup
from wstally.peer import Peer

__all__ = ["SLICE", "SLICE_CHECK", "Round", "Rounds"]

log = logsetup.get_logger("wstally.hub")

# About this long of writes per event-loop turn. Whatever becomes ready meanwhile (a
# commit's fsync answered, the batcher's task woken by it, an add read) waits for the slice
# in progress, at each of those hops: at 1 ms, an ack's p90 spent 2 ms there; at 0.3 ms,
# 0.8 ms, and the acks sent within 2.5 ms of their add went from 50-52 % to 67-73 %, at
# the same CPU (docs/benchmarks.md, fourth session).
SLICE = 0.0003
# Peers written between two looks at the clock.
SLICE_CHECK = 16


@dataclass(slots=True)
class Round:
    """One broadcast being written: to whom, and how far it got."""

    targets: list[Peer]
    force: bool
    # Whether it announces the client count (a presence frame, to whoever does not know
    # the count at its turn).
    announce: bool = False
    # The position its next connections are written up to, taken again every ``segment``
    # connections visited (Hub.visit): what is published while a round is under way goes
    # to those it has not reached yet, at the cost of one more range to encode.
    head: int = 0
    segment: int = 1
    refresh: int = 1  # the count of visits at which it is taken next
    visited: int = 0
    index: int = 0
    cost: float = 0.0  # time spent writing it, over all its slices
    delivered: int = 0  # updates written, summed over its targets
    # Frames by the range of updates they carry (after, through] and the count they
    # announce: the connections written in one segment share one range, encoded once.
    frames: dict[tuple[int, int, int], fanout.Broadcast] = field(default_factory=dict)


# Writes one peer whatever it is owed now: its own frames, then the broadcast's.
Visit = Callable[[Peer, Round], None]


class Rounds:
    """The broadcast in progress, if any, written slice by slice through ``visit``;
    ``done`` is called with it once every target has been visited."""

    def __init__(
        self, visit: Visit, done: Callable[[Round], None], context: contextvars.Context
    ) -> None:
        self.current: Round | None = None
        self._visit = visit
        self._done = done
        self._context = context
        self._handle: asyncio.Handle | None = None

    def start(self, round_: Round, sliced: bool = True) -> None:
        """Begin writing ``round_`` (the previous one must be finished): its first slice
        now, or all of it unless ``sliced``."""
        assert self.current is None, "a broadcast is still in progress"
        self.current = round_
        self._next(None if sliced else math.inf)

    def finish(self, force: bool = False) -> None:
        """Write the rest of the broadcast in progress now (``force``: past full buffers)."""
        if self.current is not None:
            self.current.force |= force
            if self._handle is not None:
                self._handle.cancel()
            self._next(math.inf)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self.current = None

    def _next(self, budget: float | None = None) -> None:
        """Visit the next peers, for about ``budget`` seconds (default: SLICE)."""
        self._handle = None
        round_ = self.current
        if round_ is None:
            return
        # Not the loop's clock: uvloop's advances once per loop turn, a millisecond at most.
        clock = time.perf_counter
        started = clock()
        deadline = started + (SLICE if budget is None else budget)
        targets, visit = round_.targets, self._visit
        index, end = round_.index, len(targets)
        while index < end:
            peer = targets[index]
            index += 1
            if peer.lag is None:
                try:
                    visit(peer, round_)
                except Exception:
                    # One socket's failure (a transport closed under us) must not end the
                    # round: a round that never ends would stop every broadcast after it.
                    log.exception("broadcast.write_failed", **peer.context())
            if not index % SLICE_CHECK and clock() > deadline:
                break
        round_.index = index
        round_.cost += clock() - started
        if index < end:
            self._handle = asyncio.get_running_loop().call_soon(self._next, context=self._context)
            return
        self.current = None
        self._done(round_)
