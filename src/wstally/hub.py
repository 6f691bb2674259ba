"""The connection manager: registry, presence and the coalesced broadcast.

Everything the server sends goes through here. A connection's own frames (acks, errors, a
snapshot) leave at the end of the event-loop tick that queued them (a batch's acks as soon
as it is answered); the broadcast visits every connection at most once per flush interval
(longer under load), as ``updates`` frames encoded and framed once and shared by the JSON
clients that are owed the same updates, handed to each socket together with its own frames
in one write. A write per small message is the cost that bounds a naive server
(docs/architecture.md and docs/benchmarks.md): this is where it is saved.

A broadcast to many sockets is written a slice per loop turn, so that it does not hold up
reads, commits and acks for its whole length, and each connection is written everything
published up to its turn: every connection keeps its own position in the feed (``Peer.sent``),
so that one written late in a round is not also written stale. What goes to whom is decided
in ``fanout`` (no I/O); ``writer`` writes.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Sequence
from typing import Any

from wstally import fanout, logsetup, protocol
from wstally.backlog import Backlog
from wstally.contention import Contention
from wstally.fanout import NOTHING, Broadcast, Mode, Phase, Shared
from wstally.flow import Flow
from wstally.laggards import Laggards
from wstally.peer import Lag, Peer
from wstally.rounds import SLICE_CHECK, Round, Rounds
from wstally.tally import Update
from wstally.writer import write_shared

__all__ = ["Hub", "Lag", "Mode", "Peer", "Phase"]

log = logsetup.get_logger("wstally.hub")

# Updates written per flush, at most: what a slow watcher can add to its buffer in one go
# past --buffer-limit (8 frames). A longer backlog leaves in the next flush, and meanwhile
# holds the flow gate shut so that the senders, not our memory, absorb it.
MAX_FLUSH = 8 * protocol.UPDATES_PER_FRAME
# A round takes the current position again this many times as it goes (at most): the
# connections it reaches later get what was published meanwhile. Each segment of the
# round is a range of updates to encode, and the next round's segments start where these
# ended, so a round encodes about this many ranges, not one per slice: at 1,000 watchers
# and 10,000 updates/s, a range holds about a thousand.
SEGMENTS = 8
# A broadcast starts at least this many times the last one's cost after that one started:
# the trade between CPU and latency, since every connection is written once per round and
# an update waits for its watcher's next turn. At 1,000 watchers x 1,000 updates/s, with
# rounds of ~12 ms of writes (the kernel's loopback path, ~11 us a socket), 1.5 against 2
# cut the fan-out p99 from 33-50 to 23-37 ms for 6.0-6.4 against 4.5-4.8 s of CPU (the
# Node peer's: 8.0), and at the throughput limit it leaves the core less idle
# (docs/benchmarks.md, ninth session).
SPACING = 1.5
# While the loop's thread waits for a CPU (contention.py), a broadcast starts at least this
# many times the last one's cost after that one started, counted as if it had been written
# in one go, ending when it ended: the CPU closer rounds would take is taken from everyone
# else on the machine. Two nodes, Redis and the load generator on two cores: ack p50
# 8.0-9.9 ms with this rule, 14.6-15.1 with 1.5 from the start, which gained no fan-out.
SPACING_CONTENDED = 2.0


class Hub:
    """Owns every registered connection and what is written to them."""

    def __init__(
        self,
        *,
        epoch: str,
        seq: int,
        total: int,
        buffer_limit: int,
        flush_interval: float,
        slow_timeout: float,
        presence_interval: float = 0.1,
        resync_interval: float = 0.02,
        on_resync: Callable[[Peer, Lag, int], None] | None = None,
        flow: Flow | None = None,
    ) -> None:
        self.epoch = epoch
        self.flow = flow if flow is not None else Flow(high=4 * MAX_FLUSH, low=MAX_FLUSH)
        # The last *published* (committed, handed to the hub) position: what a new client's
        # snapshot says, from which its own position in the feed starts.
        self.seq = seq
        self.total = total
        # Published updates that some connection has still to be written: every connection
        # that follows the broadcast has been written through backlog.base at least.
        self.backlog = Backlog(seq)
        self.buffer_limit = buffer_limit
        self.resume_below = buffer_limit // 4
        self.presence_interval = presence_interval
        # At most one broadcast per interval. A lone update still leaves at once; under load,
        # what arrives within the interval shares one write per client instead of one write
        # per update per client. On loopback a write costs a few microseconds, so at 1,000
        # clients x 1,000 updates/s a write per update would take the whole core.
        self.flush_interval = flush_interval
        self._last_flush = 0.0
        self._flush_cost = 0.0  # how long the last broadcast took
        self.contention = Contention()
        self.peers: dict[Peer, None] = {}
        self._dirty: dict[Peer, None] = {}
        self._presence_dirty = False
        self._flush_handle: asyncio.Handle | None = None
        self._own_handle: asyncio.Handle | None = None
        self._presence_handle: asyncio.TimerHandle | None = None
        # The hub's callbacks write to every connection: they run in an empty context, not
        # in that of whichever connection scheduled them, so that no event they log carries
        # another connection's bound fields.
        self._context = contextvars.Context()
        # The broadcast being written, a slice per loop turn (rounds.py).
        self.rounds = Rounds(self.visit, self._round_done, self._context)
        # Connections that fell behind: skipped, then resynced or evicted (laggards.py).
        self.laggards = Laggards(
            self,
            resume_below=self.resume_below,
            slow_timeout=slow_timeout,
            resync_interval=resync_interval,
            on_resync=on_resync,
            context=self._context,
        )
        # Counters for stats and tests.
        self.bytes_sent = 0
        self.by_mode = dict.fromkeys(Mode, 0)
        self.deliveries = 0

    # Position

    def reset(self, epoch: str, seq: int, total: int) -> None:
        """Where the feed starts (at start, before anyone connects)."""
        self.epoch, self.seq, self.total = epoch, seq, total
        self.backlog.reset(seq)

    def restart(self, epoch: str, seq: int, total: int, reason: str) -> None:
        """A new history replaced the one everyone follows: what was pending belongs to the
        old one; every client gets the new position (JSON: a snapshot, not recovered)."""
        self.finish()
        self.flow.level("broadcast", 0)
        self.reset(epoch, seq, total)
        for peer in self.peers:
            peer.sent = seq
            if peer.mode is Mode.JSON:
                self.go_live(peer, recovered=False, reason=reason)
            else:
                self.send(peer, protocol.encode_plain_total(total))

    # Registry

    def register(self, peer: Peer, hold: float = 0.0) -> None:
        """Add a connection. A JSON one gets its snapshot now, or, with ``hold``, when
        its first message arrives or ``hold`` seconds pass: a returning client's hello may
        ask for a replay, which must come before any live update (see ``release``)."""
        self.peers[peer] = None
        self.by_mode[peer.mode] += 1
        peer.sent = self.seq
        if peer.mode is Mode.JSON:
            if hold > 0:
                peer.phase = Phase.WAITING
                peer.hold = asyncio.get_running_loop().call_later(
                    hold, self.release, peer, context=self._context
                )
            else:
                self.send(peer, self.snapshot(peer))
        self._presence_changed()

    def release(self, peer: Peer) -> None:
        """End a WAITING phase (first message, or its timer): the snapshot, then live."""
        if peer.phase is Phase.WAITING and peer in self.peers:
            self.go_live(peer)
        else:
            self.cancel_hold(peer)

    def begin_replay(self, peer: Peer) -> None:
        """Broadcasts stay held while missed updates are replayed (recovery.py)."""
        self.cancel_hold(peer)
        peer.phase = Phase.REPLAYING

    def go_live(self, peer: Peer, **snapshot: Any) -> None:
        """The snapshot at the current position (with ``snapshot``'s fields), then live."""
        self.cancel_hold(peer)
        peer.phase = Phase.LIVE
        self.follow_from_here(peer)
        self.send(peer, self.snapshot(peer, **snapshot))

    def follow_from_here(self, peer: Peer) -> None:
        """``peer`` is told the current position (a snapshot, a resync): the broadcast
        owes it only what is published after it, whatever it was owed before. Its own
        frames (the snapshot) leave before any broadcast frame (``visit``)."""
        peer.sent = self.seq

    def cancel_hold(self, peer: Peer) -> None:
        if peer.hold is not None:
            peer.hold.cancel()
            peer.hold = None

    def unregister(self, peer: Peer) -> None:
        if peer not in self.peers:
            return
        del self.peers[peer]
        self.by_mode[peer.mode] -= 1
        self.cancel_hold(peer)
        self.laggards.forget(peer)
        self._dirty.pop(peer, None)
        peer.resume()
        self._presence_changed()

    @property
    def clients(self) -> int:
        return len(self.peers)

    def snapshot(self, peer: Peer | None = None, **extra: Any) -> str:
        if peer is not None:
            peer.clients_seen = self.clients
        return protocol.encode_snapshot(self.epoch, self.seq, self.total, self.clients, **extra)

    # Sending

    def send(self, peer: Peer, text: str) -> None:
        """Queue a frame for one connection; it leaves at the end of this tick.

        Frames for one connection (acks, errors, snapshots) do not wait for the broadcast
        interval: they are a handful of writes, and an ack's latency is the sender's.
        """
        peer.outbox.append(text.encode())
        self._dirty[peer] = None
        if self._own_handle is None:
            self._own_handle = asyncio.get_running_loop().call_soon(
                self._flush_own, context=self._context
            )

    def publish(self, updates: Sequence[Update]) -> None:
        """Queue committed updates for every connection, in seq order."""
        if not updates:
            return
        last = updates[-1]
        if updates[0].seq != self.seq + 1:
            # The feed promises consecutive seqs; were one missing, the backlog's ranges
            # would be off from here on. Everyone is told the new position instead.
            log.error("broadcast.gap", seq=self.seq, next=updates[0].seq)
            self.restart(self.epoch, last.seq, last.total, "a gap in the feed")
            return
        self.backlog.extend(updates)
        self.seq, self.total = last.seq, last.total
        self.flow.level("broadcast", self.seq - self.backlog.base)
        self._schedule()

    def flush_own(self, peer: Peer, limit: int | None = None, force: bool = False) -> None:
        """Write ``peer``'s own frames now; past ``limit`` buffered bytes (default: the
        buffer limit) it falls behind instead, and is resumed or evicted like any other.
        ``force`` writes whatever the buffer holds (at shutdown: before the close frame)."""
        self._dirty.pop(peer, None)
        if peer.outbox and (force or not peer.lagging):
            own, peer.outbox = peer.outbox, []
            self.write(peer, own, NOTHING, force=force, limit=limit)

    def flush_queued(self) -> None:
        """Write every connection's queued frames now rather than at the end of the tick:
        acks that waited for a commit need not wait for another loop turn too."""
        if self._own_handle is not None:
            self._own_handle.cancel()
            self._flush_own()

    def _flush_own(self) -> None:
        self._own_handle = None
        dirty, self._dirty = self._dirty, {}
        for peer in dirty:
            if peer.outbox and not peer.lagging:
                own, peer.outbox = peer.outbox, []
                self.write(peer, own, NOTHING)

    def _schedule(self) -> None:
        # While a broadcast is being written, the next one waits for its end (_round_done).
        if self._flush_handle is None and self.rounds.current is None:
            loop = asyncio.get_running_loop()
            # Spend at most about two thirds of the loop's time broadcasting (SPACING), half
            # under contention: a flush to many clients costs milliseconds, and what waits
            # meanwhile shares the next one.
            spacing = SPACING_CONTENDED if self.contention.contended else SPACING
            interval = max(self.flush_interval, spacing * self._flush_cost)
            wait = self._last_flush + interval - loop.time()
            if wait <= 0:
                self._flush_handle = loop.call_soon(self.flush, context=self._context)
            else:
                self._flush_handle = loop.call_later(wait, self.flush, context=self._context)

    def _presence_changed(self) -> None:
        # Coalesced over an interval, not a tick: a thousand clients connecting in a second
        # must not cost a thousand frames to each of them. The interval grows with the
        # audience, since every presence frame is one write per client.
        if self._presence_handle is None:
            loop = asyncio.get_running_loop()
            interval = max(self.presence_interval, len(self.peers) * 2e-5)
            self._presence_handle = loop.call_later(
                interval, self._presence_due, context=self._context
            )

    def _presence_due(self) -> None:
        self._presence_handle = None
        self._presence_dirty = True
        if self.rounds.current is None:
            self.flush()  # else at the end of the broadcast in progress

    def flush(self, force: bool = False) -> None:
        """Write everything queued since the last flush, broadcast included.

        A broadcast still being written is finished first. The writes go out a slice at a
        time (``rounds.py``); ``force`` (at shutdown) writes them all now, every update each
        connection is owed, and lagging peers their own frames (acks, errors) whatever their
        buffers hold: they are about to be closed and must not lose an ack.
        """
        self.rounds.finish(force)
        if self._flush_handle is not None:
            # Called directly (presence, shutdown), or scheduled by the round just finished:
            # a scheduled flush would only repeat us.
            self._flush_handle.cancel()
            self._flush_handle = None
        self._last_flush = asyncio.get_running_loop().time()
        announce, self._presence_dirty = self._presence_dirty, False
        behind = self.seq > self.backlog.base
        if behind or announce:
            # Frames queued for a few peers (acks, snapshots) still leave at the end of this
            # tick (_flush_own), not when the broadcast's slice reaches their peer: a new
            # connection's snapshot must not wait for a broadcast to 15,000 others.
            #
            # Always in registration order: every connection is then written about once per
            # interval, and each write carries what was published until then. (Started at
            # the same connection with what was published at the start, the last of 1,000
            # watchers waited for the 999 others' writes every time: fan-out p50 40 ms,
            # against 23 ms for the average watcher; started at a random one, every
            # watcher waited for the round's start and then for its place in it.)
            targets = list(self.peers)
        else:
            targets = list(self._dirty)
            self._dirty = {}
        if force:
            for peer in self.lagging:
                own, peer.outbox = peer.outbox, []
                if own:
                    self.write(peer, own, NOTHING, force=True)
        # Only updates are sliced: what waits behind them is the senders' acks. A presence
        # frame alone (clients joining by the thousand) goes out in one go: sliced, it cost
        # 35-70 % of the handshakes per second at 15,000 connections for as many rounds
        # and writes (docs/benchmarks.md; perhaps dearer writes to readers that went back
        # to sleep between slices).
        segment = max(SLICE_CHECK, -(-len(targets) // SEGMENTS))
        round_ = Round(targets, force, announce, head=self.seq, segment=segment, refresh=segment)
        self.rounds.start(round_, sliced=behind and not force)

    def finish(self) -> None:
        """Write the rest of a broadcast in progress now: before the history everyone
        follows is replaced (``restart``)."""
        self.rounds.finish()

    def visit(self, peer: Peer, round_: Round) -> None:
        """Write ``peer`` its own frames and what the broadcast owes it now: the updates
        published since it was last written (at most MAX_FLUSH of them unless forced), and
        the round's presence frame if it does not know the count yet."""
        own = peer.outbox
        if own:
            peer.outbox = []
        if not _follows(peer):
            if own:
                self.write(peer, own, NOTHING, round_.force)
            return
        after = peer.sent
        if after < self.backlog.base:
            # Not owed what the backlog no longer holds: it was not following when that was
            # trimmed, and was not told the position since (it is closing).
            after = self.backlog.base
        if round_.visited == round_.refresh:
            round_.refresh += round_.segment
            # Only while the round writes little to each connection. One owed more than a
            # frame's worth is behind anyway: a newer position saves it little, and costs
            # one more range of many updates, encoded and copied to a thousand sockets
            # from a buffer of its own (at 1,000 watchers and 14,000 updates/s, with one
            # per segment, fan-out throughput was 4 % lower at the median of 8 runs).
            if round_.delivered <= round_.visited * protocol.UPDATES_PER_FRAME:
                round_.head = self.seq
        round_.visited += 1
        through = round_.head
        if through < after:
            through = after  # it went live since the round took the position
        elif not round_.force and through - after > MAX_FLUSH:
            through = after + MAX_FLUSH
        shared = NOTHING
        if through > after or round_.announce:
            shared, peer.clients_seen = fanout.shared_frames(
                peer.mode, peer.phase, peer.clients_seen, self._frames(round_, after, through)
            )
        try:
            if own or shared.wire:
                self.write(peer, own, shared, round_.force)
        finally:
            # Past these, even if the write failed: a socket that cannot be written must
            # not hold the log (and the senders, through the flow gate) back. One that
            # fell behind is told the position when it drains.
            peer.sent = through
        if peer.lag is None:
            round_.delivered += through - after

    def _frames(self, round_: Round, after: int, through: int) -> Broadcast:
        """The round's frames for the updates (after, through], encoded once per round; with
        the client count as it is now, if the round announces it (a peer told the count by
        a snapshot since the round began must not be told an older one)."""
        clients = self.clients if round_.announce else 0
        key = (after, through, clients)
        frames = round_.frames.get(key)
        if frames is None:
            updates, items = self.backlog.between(after, through)
            frames = fanout.broadcast(
                updates, clients, round_.announce, self.by_mode[Mode.PLAIN] > 0, items
            )
            round_.frames[key] = frames
        return frames

    def _round_done(self, round_: Round) -> None:
        if round_.delivered:
            self.deliveries += round_.delivered
            self._flush_cost = round_.cost
        # The next broadcast is timed from this one's start (flush), not from its end: a
        # round stretched by other work between its slices is not followed by a longer
        # wait as well, which a connection would add to the time between two of its writes
        # (at 2x: fan-out p99 37-45 against 44-53 ms over four pairs, at the same CPU).
        # Unless the CPU is contended: then as if it had been written in one go, ending now.
        now = asyncio.get_running_loop().time()
        if self.contention.update(now):
            self._last_flush = now - round_.cost
        # Whoever was written early in the round is owed what was published since; a peer
        # that lags or waits for its snapshot is owed nothing (it will be told the position).
        seq = self.seq
        behind = (p.sent for p in self.peers if p.lag is None and p.sent < seq and _follows(p))
        self.backlog.trim(min(behind, default=seq))
        self.flow.level("broadcast", seq - self.backlog.base)
        if seq > self.backlog.base or self._presence_dirty:
            self._schedule()

    def write(
        self,
        peer: Peer,
        own: list[bytes],
        shared: Shared,
        force: bool = False,
        limit: int | None = None,
    ) -> None:
        """Write ``own`` (this peer's acks, errors...) then ``shared`` (the broadcast)."""
        ws = peer.ws
        buffered = ws.transport.get_write_buffer_size()
        if not fanout.may_write(buffered, self.buffer_limit if limit is None else limit, force):
            self.laggards.fall_behind(peer, own, buffered)
            return
        written = write_shared(ws, own, shared.frames, shared.wire)
        if written is None:
            return
        count = len(own) + len(shared.frames)
        peer.frames_out += count
        peer.bytes_out += written
        self.bytes_sent += written

    # Slow consumers (laggards.py)

    @property
    def lagging(self) -> dict[Peer, None]:
        return self.laggards.lagging

    @property
    def skipped(self) -> int:
        return self.laggards.skipped

    @property
    def evicted(self) -> int:
        return self.laggards.evicted

    async def until_drained(self, peer: Peer) -> None:
        """Until ``peer`` no longer lags (drained, resynced or evicted), or closes."""
        await self.laggards.until_drained(peer)

    def close(self) -> None:
        for handle in (self._flush_handle, self._own_handle, self._presence_handle):
            if handle is not None:
                handle.cancel()
        self.rounds.cancel()
        self.laggards.close()
        self.contention.close()
        self._flush_handle = self._own_handle = self._presence_handle = None


def _follows(peer: Peer) -> bool:
    """Whether the broadcast writes to ``peer`` (a JSON one once it has its snapshot)."""
    return peer.mode is Mode.PLAIN or peer.phase is Phase.LIVE
