"""The server's WebSocket connection: websockets' own, plus a frame budget, a read hold,
and reads split into frames so that adds skip websockets' parser and queue (wire.py).

websockets answers pings and buffers frames before the handler ever sees them, so a budget
kept in the handler would miss a ping flood entirely: it is counted here, per frame, as the
frames come off the wire. The read hold lets a shutdown stop reading, answer every frame
already read, and only then send the close frame.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import CONNECTING, OPEN, SEND_EOF
from websockets.streams import StreamReader

from wstally import logsetup, wire
from wstally.budgets import Window
from wstally.penalty import Penalties
from wstally.request_guard import guarded_parse

__all__ = ["CONTROL_LIMIT", "FLOOD", "FLOOD_ABORT", "Intake", "TallyConnection", "connection_class"]

log = logsetup.get_logger("wstally.server")

# Close code for a connection that sends frames faster than its budget (protocol.md).
FLOOD = CloseCode.POLICY_VIOLATION
# Pings and pongs a second, within the frame budget (0 there disables this one too).
CONTROL_LIMIT = 100
CONTROL = (Opcode.PING, Opcode.PONG)
# Reads are fed to websockets' parser this many bytes at a time (~170 pings), for at most
# TURN seconds before the loop's other callbacks get their turn (see data_received).
SLICE = 1024
TURN = 0.001
# After the close frame, what a flooder sends is discarded unread (cheap); it gets this long
# to read the close frame and its reason (on a loaded machine, a second was not always
# enough), then the connection is cut.
FLOOD_ABORT = 5.0


# Frames are split out of reads (wire.py) up to this payload size, or the server's max_size
# if smaller; a larger one turns the split off for the connection (websockets parses all).
MAX_SPLIT = 65535
# Where websockets' frame parser waits when it stands at a frame's first byte.
_AT_FRAME_START = StreamReader.at_eof.__code__
# The handler's taker of text messages read straight off the wire: (Intake.direct, texts)
# -> how many of them, from the first, it took. One per server, not per connection: a bound
# partial cost 0.36 KiB a connection.
Take = Callable[[Any, list[str]], int]


def at_frame_start(parser: Generator[None]) -> bool:
    """Whether websockets' parser waits for the first byte of a frame (not midway through
    one whose first bytes it has already consumed)."""
    gen: Any = parser
    while (inner := getattr(gen, "gi_yieldfrom", None)) is not None:
        gen = inner
    return getattr(gen, "gi_code", None) is _AT_FRAME_START


class Intake:
    """What a connection has read, and what it may still read: its frame budgets, the bytes
    waiting to be parsed, and whether reading is held or over."""

    __slots__ = (
        "backlog",
        "control",
        "direct",
        "eof",
        "flooded",
        "fragmented",
        "frames",
        "held",
        "partial",
        "received",
        "split",
    )

    def __init__(self, now: float) -> None:
        self.frames = Window(now)  # every frame, the frame budget
        self.control: Window | None = None  # pings and pongs (made at the first one)
        self.flooded = False  # closed for flooding: what it still sends is dropped unparsed
        self.received = 0  # bytes read since the keepalive last looked
        self.backlog = bytearray()  # read, not yet parsed (see data_received)
        self.eof = False  # the peer's EOF came while slices were waiting
        self.held = False  # a shutdown stopped reading (hold_reading)
        # Reads split into frames (wire.py): 0 not yet (until the handshake is done), the
        # payload limit once on, -1 off for good (compression, an oversized frame).
        self.split = 0
        self.partial = b""  # the start of a frame whose end has not come yet
        self.fragmented = False  # websockets holds the first fragments of a message
        # While the handler reads: what it takes messages off the wire for (its Peer),
        # passed back to the server's Take; None: nothing is taken off the wire.
        self.direct: object | None = None


class TallyConnection(ServerConnection):
    # Frames per second a connection may send, every kind counted (text, binary, ping,
    # pong, continuation); 0 disables the budget. Set on a subclass per server.
    frame_limit = 0
    # Addresses that flooded, shared by the server's connections; None: no penalties.
    penalties: Penalties | None = None
    # The handler's taker of messages straight off the wire (Take); None: none taken.
    take: Take | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One attribute, not eight: websockets' own 25 keep the instance dict's keys shared
        # between connections; past 30 each connection had a dict of its own, 1.3 KiB more
        # (19.45 → 21.2 KiB per connection at 15,000).
        self.intake = Intake(self.loop.time())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # websockets resumes reading once the handler drains its queue: not while read
        # bytes still wait to be parsed (a read would jump the queue), nor during a hold.
        self.recv_messages.resume = self._resume_reading
        protocol = self.protocol
        protocol.parser = guarded_parse(protocol, self._banned())
        next(protocol.parser)

    def _address(self) -> str:
        peer = self.transport.get_extra_info("peername")
        return str(peer[0]) if isinstance(peer, tuple) and peer else ""

    def _banned(self) -> float:
        if self.penalties is None:
            return 0.0
        return self.penalties.refused_for(self._address(), self.loop.time())

    def data_received(self, data: bytes) -> None:
        self.intake.received += len(data)
        if self.intake.flooded:
            return  # closed for flooding: what it still sends is dropped unparsed
        if self.intake.backlog:
            # Slices of an earlier read are still waiting their turn: keep the order, and
            # read no more until they are parsed.
            self.intake.backlog += data
            self.transport.pause_reading()
            return
        if len(data) <= SLICE:
            self._parse(data)
            return
        # websockets parses (and answers, for pings) every frame of a read before we count
        # one, in one go: a 256 KiB read of pings is 40,000 frames and 0.3 s of a loop that
        # others' acks wait for. In slices, TURN at a time: a flood is cut within a slice of
        # crossing its budget, and others' callbacks run between the turns.
        self.intake.backlog = bytearray(data)
        self.transport.pause_reading()
        self._feed()

    def _parse(self, data: bytes) -> None:
        if self.intake.split > 0 or self._start_split():
            self._split(data)
        else:
            super().data_received(data)

    def _start_split(self) -> bool:
        """Split reads from now on, if the connection is open and websockets' parser stands
        at a frame's first byte (so that the two never disagree on where frames start)."""
        intake = self.intake
        protocol = self.protocol
        if intake.split < 0 or protocol.state is not OPEN:
            if protocol.state is not CONNECTING:
                intake.split = -1
            return False
        if protocol.extensions:
            intake.split = -1  # compressed frames need websockets' decoder
            return False
        if protocol.reader.buffer or not at_frame_start(protocol.parser):
            return False  # midway through a frame: try again at the next read
        # Fragments of a message may have come with the handshake: websockets holds them,
        # and text frames must go to it until the last one (or it closes with 1002).
        intake.fragmented = protocol.current_size is not None
        size = protocol.max_message_size
        intake.split = MAX_SPLIT if size is None else min(size, MAX_SPLIT)
        return True

    def _split(self, data: bytes) -> None:
        """Whole frames only: runs of the common text frame straight to the handler
        (_take), any other frame to websockets' parser, in runs of whole frames, in order."""
        intake = self.intake
        if intake.partial:
            data = intake.partial + data
            intake.partial = b""
        limit = intake.split
        n = len(data)
        pos = run = 0  # run: where the frames not yet handed to anyone start
        queued = False  # a data frame went to websockets: the later ones follow it there
        # Text frames from ``run`` on, not handed over yet: their texts and where each ends.
        # The handler takes a run of them in one call (a call per frame was a tenth of the
        # server's CPU per add), before any frame that follows goes to websockets.
        texts: list[str] = []
        ends: list[int] = []
        budget = self.frame_limit
        frames = intake.frames
        clock = self.loop.time
        # Whether the handler takes frames now; only websockets and the handler change
        # that, so it is asked again after each of them had a turn.
        taking = self._taking()
        end = n
        while pos < n:
            end = wire.frame_end(data, pos, limit)
            if end <= 0:
                break
            first = data[pos]
            if first == wire.TEXT and not queued and not intake.fragmented:
                if run < pos and not texts:
                    # Pings, pongs before it: websockets answers them first.
                    super().data_received(data[run:pos])
                    run = pos
                    if intake.flooded:
                        return
                    taking = self._taking()
                # Not taken: invalid UTF-8 (websockets closes with 1007), or no taker now.
                text = wire.text_payload(data, pos, end) if taking else None
                if text is not None:
                    # Counted here, on an open connection; if the handler declines it,
                    # _take uncounts it for websockets to count.
                    if budget and frames.over(budget, clock):
                        # The frames within the budget are answered; from this one on,
                        # what it sent is dropped unparsed, as in data_received.
                        run, declined = self._take(texts, ends, run)
                        if declined and not intake.flooded:
                            super().data_received(data[run:pos])
                        self.close_for_flood(
                            f"too many frames: at most {budget} per second", budget, "frames"
                        )
                        return
                    texts.append(text)
                    ends.append(end)
                    pos = end
                    continue
                queued = True
            elif wire.is_data(first):
                queued = True
                intake.fragmented = wire.unfinished(first, intake.fragmented)
            if texts:
                run, declined = self._take(texts, ends, run)
                queued = queued or declined
                texts, ends = [], []
                if intake.flooded:
                    return
                taking = self._taking()
            pos = end
        if texts:
            run, _ = self._take(texts, ends, run)
            if intake.flooded:
                return
        if end == wire.NOT_OURS:
            intake.split = -1  # websockets judges this frame, and parses all that follows
            super().data_received(data[run:])
            return
        if run < pos:
            super().data_received(data[run:pos])
        if pos < n:
            intake.partial = data[pos:]

    def _taking(self) -> bool:
        """Whether the handler takes messages straight off the wire now: it waits for one,
        with none in hand or queued, on an open connection."""
        if self.intake.direct is None or self.take is None or self.protocol.state is not OPEN:
            return False
        waiter = self.recv_messages.frames.get_waiter
        return waiter is not None and not waiter.done()

    def _take(self, texts: list[str], ends: list[int], run: int) -> tuple[int, bool]:
        """Hand a run of text frames' messages, collected while the handler takes frames
        (_taking), to the handler, which takes them from the first on (adds it applies at
        once) and says how many. The run starts at ``run``, and its frames end at ``ends``.
        Returns where the frames not taken start, and whether any was left to websockets
        (the frames after it then go there too, in order)."""
        if not texts:
            return run, False
        taken = 0
        take = self.take
        if take is not None:
            try:
                taken = take(self.intake.direct, texts)
            except Exception:
                # What websockets does when a handler raises: log it, close with 1011.
                # What follows in the run is discarded, as websockets discards a failed
                # connection's frames.
                self.logger.error("connection handler failed", exc_info=True)
                self.protocol.fail(CloseCode.INTERNAL_ERROR)
                self.send_data()
                return ends[-1], False
        left = len(texts) - taken
        if left and self.frame_limit:
            # websockets counts these (process_event): once, not twice.
            self.intake.frames.count -= left
        return (ends[taken - 1] if taken else run), left > 0

    def _resume_reading(self) -> None:
        intake = self.intake
        if not intake.backlog and not intake.held and not self.transport.is_closing():
            self.transport.resume_reading()

    def _feed(self) -> None:
        backlog = self.intake.backlog
        if self.transport.is_closing():
            backlog.clear()  # nothing read now could be answered
            return
        deadline = time.perf_counter() + TURN
        while backlog and not self.intake.flooded:
            data = bytes(backlog[:SLICE])
            del backlog[:SLICE]
            self._parse(data)
            if time.perf_counter() >= deadline:
                break
        if self.intake.flooded:
            backlog.clear()
        if backlog:
            self.loop.call_soon(self._feed)
            return
        if self.intake.eof:
            # The peer's EOF, kept behind the slices: now websockets may see it, and the
            # transport closes as it would have (eof_received returned True meanwhile).
            self.intake.eof = False
            if not super().eof_received():
                self.transport.close()
            return
        # Read again, unless websockets' receive queue is full or a shutdown holds reads.
        if not self.recv_messages.paused:
            self._resume_reading()

    # websockets' own returns None (close the transport); True keeps it open.
    def eof_received(self) -> bool | None:  # type: ignore[override]
        if self.intake.backlog:
            self.intake.eof = True  # after the slices still waiting, or they would be lost
            return True
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.intake.backlog.clear()  # read but never parsed: it goes with the connection
        self.intake.partial = b""
        self.intake.direct = None
        super().connection_lost(exc)

    def send_data(self) -> None:
        # Each ping queues a pong, and websockets writes each on its own: 700 write calls
        # for one slice of pings. Joined, one (and the pongs still go out in order).
        writes = self.protocol.writes
        if len(writes) > 1 and SEND_EOF not in writes:
            self.protocol.writes = [b"".join(writes)]
        super().send_data()

    def process_event(self, event: Any) -> None:
        super().process_event(event)
        limit = self.frame_limit
        if limit and type(event) is Frame:
            if self.intake.frames.over(limit, self.loop.time):
                reason = f"too many frames: at most {limit} per second"
                self.close_for_flood(reason, limit, "frames")
            elif event.opcode in CONTROL:
                self._control_frame()

    def _control_frame(self) -> None:
        # Pings cost the most (each earns a pong) and an honest client sends one every few
        # seconds: 20,000 of them (the frame budget) were still 0.1 s of loop per session.
        intake = self.intake
        window = intake.control
        if window is None:
            window = intake.control = Window(self.loop.time())
        if window.over(CONTROL_LIMIT, self.loop.time):
            reason = f"too many pings and pongs: at most {CONTROL_LIMIT} per second"
            self.close_for_flood(reason, CONTROL_LIMIT, "control")

    def close_for_flood(self, reason: str, limit: int, kind: str) -> None:
        """Close with 1008 and ``reason``; its address waits before connecting again."""
        if self.intake.flooded or self.protocol.state.name != "OPEN":
            return
        self.intake.flooded = True  # what it still sends is dropped unparsed
        ban = 0.0
        if self.penalties is not None:
            ban = self.penalties.strike(self._address(), self.loop.time())
        log.warning("conn.flood", conn=logsetup.conn_id(self), limit=limit, kind=kind, ban_s=ban)
        self.protocol.fail(FLOOD, reason)
        self.send_data()
        # The close handshake would wait on a client that is busy flooding: cut it short.
        self.loop.call_later(FLOOD_ABORT, self.transport.abort)

    # Keepalive

    async def keepalive(self) -> None:
        """websockets' keepalive, except that a connection we are not reading is not dead.

        When commits or broadcasts fall behind, the server stops reading its senders
        (flow.py): a sender's pong then waits in the socket behind adds we do not read, and
        websockets would close it with 1011 after --ping-timeout. While reading is paused,
        or while the peer's data keeps arriving, the wait for the pong starts over; a
        connection that sends nothing while we read times out as usual.
        """
        assert self.ping_interval is not None
        latency = 0.0
        try:
            while True:
                await asyncio.sleep(self.ping_interval - latency)
                pong = await self.ping()
                if self.ping_timeout is not None:
                    latency = await self._await_pong(pong, self.ping_timeout)
        except Exception:
            self.logger.error("keepalive ping failed", exc_info=True)

    async def _await_pong(self, pong: Awaitable[float], patience: float) -> float:
        pong = asyncio.ensure_future(pong)  # shielded below: a timeout must not cancel it
        self.intake.received = 0
        reading = self.transport.is_reading()
        while True:
            try:
                async with asyncio.timeout(patience):
                    return await asyncio.shield(pong)
            except TimeoutError:
                # A loop busy for longer than the patience (a huge broadcast, a test's client
                # writing without pause) wakes this timeout before the reads that came
                # meanwhile: one turn of the loop lets them be counted first.
                await asyncio.sleep(0)
                if pong.done():
                    return await pong
                # Alive if we hold it (not reading) or it sent us something meanwhile: its
                # pong is on its way, behind the data we read (or do not) first. Held at
                # the last look counts too: reading that resumed just now (the flow gate
                # opened) has had no time to bring anything, and a test failed 1 run in 5-20
                # on that race (1011 to a sender whose pong waited behind its adds).
                received, self.intake.received = self.intake.received, 0
                was_reading, reading = reading, self.transport.is_reading()
                if was_reading and reading and not received:
                    break
        async with self.send_context():
            self.protocol.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
        raise AssertionError("send_context() waits for connection_lost(), which cancels us")

    # Shutdown

    def hold_reading(self) -> None:
        """Read nothing more from the socket; frames already read stay queued."""
        if self.protocol.state.name in ("CLOSING", "CLOSED"):
            return
        self.intake.held = True  # and websockets' resume does nothing (_resume_reading)
        self.transport.pause_reading()

    def release_reading(self) -> None:
        """Read again: the close handshake needs the client's close frame."""
        self.intake.held = False
        if not self.recv_messages.paused:
            self._resume_reading()

    def queued(self) -> int:
        """Frames read from the socket that the handler has not taken yet (at least one
        while read bytes wait to be parsed)."""
        return len(self.recv_messages.frames) + (1 if self.intake.backlog else 0)


def connection_class(
    frame_limit: int, penalties: Penalties | None, take: Take | None = None
) -> type[TallyConnection]:
    """A connection class with this server's frame budget, flood penalties and taker."""
    fields = {
        "frame_limit": frame_limit,
        "penalties": penalties,
        "take": None if take is None else staticmethod(take),
    }
    return type("TallyConnection", (TallyConnection,), fields)
