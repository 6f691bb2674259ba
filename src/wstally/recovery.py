"""Recovery: a returning client gets every update it missed, then a snapshot, then live.

A hello with ``since`` and ``epoch`` asks for it (docs/protocol.md §4.9). The replay reads
the engine's history a frame's worth at a time, so the loop is never held long, commits
take turns with the reads, and a client that does not read is paused and, in time, evicted
like any other slow consumer: 600 clients asking for 100,000 updates each and reading
nothing once made everyone else's acks take seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

from websockets.protocol import State

from wstally import logsetup, protocol
from wstally.engine.base import Engine
from wstally.hub import Hub, Peer, Phase
from wstally.metrics import Tallies

__all__ = ["CHUNK", "MAX_RECOVERY", "MAX_REPLAYS", "REPLAY_SHARE", "REPLAY_SNDBUF", "Recovery"]

log = logsetup.get_logger("wstally.server")

# A returning client gets at most this many missed updates replayed; further behind, it
# gets a snapshot (the engines keep at least this many).
MAX_RECOVERY = 100_000
# Updates read and sent per step: one updates frame's worth.
CHUNK = protocol.UPDATES_PER_FRAME
# Replays read the store and encode on the loop: at most this many at once, so that many
# clients asking for 100,000 updates each cannot crowd out the commits (and so the acks).
MAX_REPLAYS = 2
# ... and all of them together take at most this share of the loop's time: 600 clients
# asking for 100,000 updates each once kept the loop busy encoding, and others' acks 14x
# slower. An honest 100,000-update replay still takes only seconds.
REPLAY_SHARE = 0.25
# A replaying connection's kernel send buffer (Linux doubles it): left to autotuning, the
# kernel took ~1 MB of a client that reads nothing before the server's own buffer (which
# pauses and evicts it) saw a byte. Restored to AFTER_REPLAY_SNDBUF once live.
REPLAY_SNDBUF = 32 * 1024
AFTER_REPLAY_SNDBUF = 1024 * 1024


class Recovery:
    def __init__(self, hub: Hub, engine: Engine, tallies: Tallies) -> None:
        self.hub = hub
        self.engine = engine
        self.tallies = tallies
        self._replays = asyncio.Semaphore(MAX_REPLAYS)
        # Loop time before which no replay step may start (REPLAY_SHARE's accounting).
        self._next_step = 0.0

    async def recover(self, peer: Peer, since: int, epoch: str) -> None:
        """Send a returning client every update it missed, then a snapshot, then live.

        While the history is read (off the event loop), broadcasts to this peer are held
        back; the rows read cover them, up to the hub's position at the moment live
        delivery resumes, so the client sees no gap and no duplicate.
        """
        hub = self.hub
        if epoch != hub.epoch:
            return self._not_recovered(peer, since, "new history: the epoch changed")
        if since > hub.seq:
            return self._not_recovered(peer, since, "since is ahead of this server's history")
        if hub.seq - since > MAX_RECOVERY:
            return self._not_recovered(peer, since, f"more than {MAX_RECOVERY} updates behind")
        hub.begin_replay(peer)
        _send_buffer(peer, REPLAY_SNDBUF)
        try:
            await self._replay(peer, since)
        finally:
            if peer.phase is not Phase.LIVE:  # cancelled (shutdown), or the client left
                hub.go_live(peer, recovered=False, reason="replay interrupted")
            _send_buffer(peer, AFTER_REPLAY_SNDBUF)

    async def _replay(self, peer: Peer, since: int) -> None:
        hub = self.hub
        ws = peer.ws
        epoch = hub.epoch
        replayed = 0
        cursor = since
        behind = hub.seq - since
        # A chunk at a time: commits (and so acks) take turns with the reads on the store's
        # thread, and the loop is never held for more than one chunk's encoding.
        while cursor < hub.seq:
            # Reading and encoding are bounded (MAX_REPLAYS at once); waiting for a client
            # to read is not, so a client that never reads cannot hold up anyone's replay.
            if hub.seq - cursor > behind + MAX_RECOVERY:
                # Live updates outran the paced replay by as much again as it may replay: a
                # snapshot instead, never a replay that cannot end.
                return self._not_recovered(peer, since, "the replay fell too far behind")
            async with self._replays:
                await self._take_turn()
                started = time.perf_counter()
                try:
                    batch = await self.engine.history(cursor, min(hub.seq - cursor, CHUNK))
                except Exception as exc:
                    # Whatever failed, the client must not be left waiting for a replay.
                    log.error("conn.recovery_failed", since=since, error=str(exc))
                    return self._not_recovered(peer, since, "history unavailable")
                if hub.epoch != epoch:
                    return self._not_recovered(peer, since, "new history: the epoch changed")
                if not batch or batch[0].seq != cursor + 1:
                    # Whatever was replayed so far is superseded by the snapshot.
                    return self._not_recovered(peer, since, "those updates are no longer kept")
                if peer not in hub.peers or ws.protocol.state is not State.OPEN:
                    return None  # gone meanwhile
                for frame in protocol.encode_updates_frames(batch):
                    hub.send(peer, frame)
                replayed += len(batch)
                cursor = batch[-1].seq
                # Replayed bytes count toward the slow-consumer limit like any others; a
                # replay also waits for its client sooner (at a quarter of the limit), as
                # it could otherwise fill the buffer of a client that reads nothing.
                hub.flush_own(peer, limit=hub.resume_below)
                self._spent(time.perf_counter() - started)
            if peer.lagging:
                await hub.until_drained(peer)
        hub.go_live(peer, recovered=True)
        self.tallies.replays["recovered"] += 1
        log.info("conn.recovered", since=since, updates=replayed, seq=hub.seq)

    async def _take_turn(self) -> None:
        wait = self._next_step - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)

    def _spent(self, seconds: float) -> None:
        """A step took ``seconds``, its read included (the read's thread takes the GIL from
        the loop, and the store's time from the commits); the next may start once the
        others have had their share. This overcharges a step whose read waited: an honest
        replay is slowed, never others."""
        now = asyncio.get_running_loop().time()
        self._next_step = max(self._next_step, now) + seconds * (1 / REPLAY_SHARE - 1)

    def _not_recovered(self, peer: Peer, since: int, reason: str) -> None:
        self.tallies.replays["not_recovered"] += 1
        # The snapshot is the current position: live updates continue from it.
        self.hub.go_live(peer, recovered=False, reason=reason)
        log.info("conn.not_recovered", since=since, reason=reason, seq=self.hub.seq)


def _send_buffer(peer: Peer, size: int) -> None:
    # Setting it turns the kernel's autotuning off for this socket: AFTER_REPLAY_SNDBUF is a
    # fixed size (capped at twice net.core.wmem_max), not the default restored.
    transport = peer.ws.transport
    sock = transport.get_extra_info("socket")
    if sock is None or transport.is_closing():
        return
    # Closed meanwhile: uvloop's socket object then raises ValueError (a negative fd).
    with contextlib.suppress(OSError, ValueError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
