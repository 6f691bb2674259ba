"""Slow consumers: connections that stopped reading fast enough, as the hub handles them.

A connection whose write buffer passes ``--buffer-limit`` is skipped by the broadcast (it
lags) and its reads are paused; once it drains it is resynced from a snapshot (whatever it
missed is summed up by the current position), and if it stays behind past
``--slow-timeout`` it is closed with 4008. The verdicts are ``fanout``'s (no I/O); the
writes are the hub's.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import TYPE_CHECKING

from websockets.protocol import State

from wstally import fanout, logsetup
from wstally.fanout import NOTHING, Verdict
from wstally.peer import Lag, Peer

if TYPE_CHECKING:
    from wstally.hub import Hub

__all__ = ["SLOW_CONSUMER", "Laggards"]

log = logsetup.get_logger("wstally.hub")

OPEN = State.OPEN
# Close code for a client evicted for not reading (application range, see protocol.md).
SLOW_CONSUMER = 4008


class Laggards:
    """The connections that lag, checked every ``resync_interval`` until they drain
    (resynced, then ``on_resync``) or time out (evicted)."""

    def __init__(
        self,
        hub: Hub,
        *,
        resume_below: int,
        slow_timeout: float,
        resync_interval: float,
        on_resync: Callable[[Peer, Lag, int], None] | None,
        context: contextvars.Context,
    ) -> None:
        self.hub = hub
        self.resume_below = resume_below
        self.slow_timeout = slow_timeout
        self.resync_interval = resync_interval
        self.on_resync = on_resync
        self._context = context
        self.lagging: dict[Peer, None] = {}
        self._handle: asyncio.TimerHandle | None = None
        # Counters for stats and tests.
        self.skipped = 0
        self.evicted = 0

    async def until_drained(self, peer: Peer) -> None:
        """Until ``peer`` no longer lags (drained, resynced or evicted), or closes."""
        # Also return when the connection closes, or its handler would never finish.
        if peer.lag is None:
            return
        drained = asyncio.ensure_future(peer.lag.drained.wait())
        closed = asyncio.ensure_future(peer.ws.wait_closed())
        await asyncio.wait([drained, closed], return_when=asyncio.FIRST_COMPLETED)
        drained.cancel()
        closed.cancel()

    def fall_behind(self, peer: Peer, own: list[bytes], buffered: int) -> None:
        """Stop writing to ``peer`` until it drains, then resync it from a snapshot.

        Broadcast frames are dropped (the snapshot supersedes them); frames addressed to the
        peer alone (acks, errors) are kept, and stay bounded because its reads are paused.
        """
        loop = asyncio.get_running_loop()
        hub = self.hub
        peer.lag = Lag(loop.time(), peer.sent)  # what it was written through
        peer.lagged += 1
        self.lagging[peer] = None
        self.skipped += 1
        peer.outbox = own + peer.outbox
        # Once per episode (the peer is skipped until it drains), never per skipped write.
        log.warning(
            "broadcast.lagging",
            **peer.context(),
            buffered=buffered,
            limit=hub.buffer_limit,
            lagged=peer.lagged,
            seq=hub.seq,
            lagging=len(self.lagging),
        )
        if self._handle is None:
            self._handle = loop.call_later(self.resync_interval, self._check, context=self._context)

    def release(self, peer: Peer) -> None:
        """Stop holding ``peer`` back (at shutdown, whether or not it drained): it is told
        the position now, past its buffer limit if need be, as a resync would, and is
        written what follows it. Resumed without it, it would be written from wherever the
        broadcast stood when it fell behind: a gap, and no final position."""
        if self.lagging.pop(peer, None) is None and peer.lag is None:
            return
        self._tell_position(peer)
        peer.resume()
        self.hub.flush_own(peer, force=True)

    def _tell_position(self, peer: Peer) -> None:
        """Queue ``peer`` the current position, which sums up what it missed (nothing in the
        middle of a replay, which covers it): the broadcast owes it only what follows."""
        hub = self.hub
        frame = fanout.resync_frame(peer.mode, peer.phase, hub.snapshot(peer), hub.total)
        if frame is not None:
            peer.outbox.append(frame)
        hub.follow_from_here(peer)

    def forget(self, peer: Peer) -> None:
        """``peer`` left (unregistered)."""
        self.lagging.pop(peer, None)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = None
        now = asyncio.get_running_loop().time()
        for peer in list(self.lagging):
            ws, lag = peer.ws, peer.lag
            if ws.protocol.state is not OPEN or lag is None:
                del self.lagging[peer]
                self.hub.follow_from_here(peer)  # owed nothing: it is closing
                peer.resume()
                continue
            verdict = fanout.lag_verdict(
                ws.transport.get_write_buffer_size(),
                self.resume_below,
                now - lag.since,
                self.slow_timeout,
            )
            if verdict is Verdict.EVICT:
                self._evict(peer)
            elif verdict is Verdict.RESUME:
                self._resync(peer, lag)
        if self.lagging and self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(
                self.resync_interval, self._check, context=self._context
            )

    def _resync(self, peer: Peer, lag: Lag) -> None:
        hub = self.hub
        del self.lagging[peer]
        peer.lag = None
        self._tell_position(peer)
        own, peer.outbox = peer.outbox, []
        hub.write(peer, own, NOTHING)
        if peer.lag is None:
            lag.drained.set()
            if self.on_resync is not None:
                self.on_resync(peer, lag, hub.seq)

    def _evict(self, peer: Peer) -> None:
        """Close a connection that stayed behind for too long: 4008 "slow consumer"."""
        del self.lagging[peer]
        self.hub.follow_from_here(peer)  # owed nothing: it is being closed
        lag_since = peer.lag.since if peer.lag is not None else 0.0
        self.evicted += 1
        ws = peer.ws
        log.warning(
            "conn.evicted",
            **peer.context(),
            buffered=ws.transport.get_write_buffer_size(),
            lagging_for=round(asyncio.get_running_loop().time() - lag_since, 3),
            code=SLOW_CONSUMER,
        )
        # The close frame queues behind everything it did not read; it is not waited for.
        ws.protocol.fail(SLOW_CONSUMER, "slow consumer")
        ws.send_data()
        asyncio.get_running_loop().call_later(1.0, ws.transport.abort)
        peer.resume()
