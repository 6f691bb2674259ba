"""A broadcast being written: a slice of its connections per event-loop turn.

A broadcast of updates to a thousand sockets takes 5-20 ms of writes. Written in one go,
it holds up everything else the loop has to do: reading adds, taking finished commits,
sending acks, which then wait behind it once or twice each. Written 0.3 ms at a time,
with a loop turn between slices, they go out in between. At most one broadcast is in
progress; whatever must not overtake it (a snapshot, a resync, the next broadcast) calls
``finish`` first, which writes the rest of it at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from wstally import fanout, logsetup
from wstally.fanout import Shared
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

# Writes one peer its own frames, then the shared ones (Hub.write); the last argument is
# ``force``.
Write = Callable[[Peer, list[bytes], Shared, bool], None]


@dataclass(slots=True)
class Round:
    """One broadcast being written: to whom, and how far it got."""

    frames: fanout.Broadcast
    targets: list[Peer]
    updates: int
    force: bool
    index: int = 0
    cost: float = 0.0  # time spent writing it, over all its slices


class Rounds:
    """The broadcast in progress, if any, written slice by slice through ``write``;
    ``done`` is called with it once every target has been written."""

    def __init__(
        self, write: Write, done: Callable[[Round], None], context: contextvars.Context
    ) -> None:
        self.current: Round | None = None
        self._write = write
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
        """Write the next peers, for about ``budget`` seconds (default: SLICE)."""
        self._handle = None
        round_ = self.current
        if round_ is None:
            return
        # Not the loop's clock: uvloop's advances once per loop turn, a millisecond at most.
        clock = time.perf_counter
        started = clock()
        deadline = started + (SLICE if budget is None else budget)
        frames, targets, force, write = round_.frames, round_.targets, round_.force, self._write
        index, end = round_.index, len(targets)
        while index < end:
            peer = targets[index]
            index += 1
            if peer.lag is None:
                own = peer.outbox
                if own:
                    peer.outbox = []
                shared, peer.clients_seen = fanout.shared_frames(
                    peer.mode, peer.phase, peer.clients_seen, frames
                )
                try:
                    if own or shared.wire:
                        write(peer, own, shared, force)
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
