"""The connection handler: read a frame, parse it, spend the budgets, hand adds to the
batcher, answer the rest; one ``conn.closed`` line at the end.

A connection's phase with the broadcast (waiting for its hello, replaying, live) is the
hub's (peer.Phase); the handler only says when the first message came (``release``) or that
a replay answers instead (``cancel_hold``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from wstally import logsetup, protocol
from wstally.batcher import Batcher
from wstally.budgets import TokenBucket, Window
from wstally.config import ServerConfig
from wstally.connection import TallyConnection
from wstally.endpoints import first_header
from wstally.engine.base import Submission
from wstally.flow import Flow
from wstally.hub import Hub, Lag, Mode, Peer, Phase
from wstally.metrics import Tallies
from wstally.protocol import SUBPROTOCOL, Add, Hello, ProtocolError
from wstally.recovery import Recovery

__all__ = ["HELLO_WINDOW", "REFUSALS_LOGGED", "Handler", "Host", "resynced"]

log = logsetup.get_logger("wstally.server")

_new = tuple.__new__

# A client sending garbage in a loop must not flood the log: the first refusals of each
# connection are logged at info, later ones at debug (conn.closed counts them all).
REFUSALS_LOGGED = 20
# A new JSON connection's snapshot waits this long for its hello (or any first message),
# so that a returning client's replay can precede every live update. Send hello at once.
HELLO_WINDOW = 0.05


class Host(Protocol):
    """The parts of a server the handler uses (a TallyServer is one)."""

    config: ServerConfig
    hub: Hub
    batcher: Batcher
    recovery: Recovery
    flow: Flow
    tallies: Tallies
    draining: bool


class Handler:
    def __init__(self, server: Host) -> None:
        self.server = server
        # Replays in progress: cancelled at shutdown (they read from an engine about to close).
        self.tasks: set[asyncio.Future[None]] = set()
        # Counters for server.stats (per connection or refusal, never per update).
        self.opened = 0
        self.closed = 0
        self.refused = 0
        self.taken = 0  # adds taken straight off the wire (take), the others via handle()
        # Per-update events are debug: decide once whether to build them at all.
        self._debug = logsetup.enabled_for(logging.DEBUG)

    async def cancel_replays(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def handle(self, ws: ServerConnection) -> None:
        """One connection, from its handshake to its close: read, answer, log once."""
        mode = Mode.JSON if ws.subprotocol == SUBPROTOCOL else Mode.PLAIN
        peer = Peer(ws, mode, logsetup.conn_id(ws))
        structlog.contextvars.bind_contextvars(**peer.context())
        opened = time.monotonic()
        self.opened += 1
        # Registered and unregistered in one try/finally: whatever fails in between, the
        # connection never stays counted (a leak once locked everyone out with 503s).
        try:
            self.server.hub.register(peer, hold=HELLO_WINDOW)
            agent = first_header(ws.request, "User-Agent")
            log.info(
                "conn.opened",
                clients=self.server.hub.clients,
                user_agent=None if agent is None else protocol.escape_text(agent, 80),
            )
            flow = self.server.flow
            if isinstance(ws, TallyConnection):
                # Adds it can apply at once come straight from the connection's reads.
                ws.intake.direct = peer
            async for message in ws:
                if ws.protocol.close_sent is not None and ws.protocol.close_rcvd is None:
                    # We closed it (a flood, an eviction, the shutdown): what it sent after
                    # cannot be answered, and a flood's queued frames (tens of thousands
                    # from one read) must not hold the loop. The client knows to resend.
                    break
                if self.server.draining:
                    # Read while the close is on its way: answered (shutting_down) and
                    # written at once, so that the answer precedes the close frame.
                    self._on_message(peer, message)
                    self.server.hub.flush_own(peer, force=True)
                    continue
                if peer.lagging:
                    await self.server.hub.until_drained(peer)
                if flow.blocked:
                    await flow.wait()
                self._on_message(peer, message)
        except ConnectionClosed:
            pass
        finally:
            if isinstance(ws, TallyConnection):
                ws.intake.direct = None
            self.server.hub.unregister(peer)
            self.closed += 1
            # The canonical line: everything about this connection, once, at its end.
            reason = ws.close_reason
            log.info(
                "conn.closed",
                duration=round(time.monotonic() - opened, 3),
                code=ws.close_code,
                # The client chooses the reason: escaped, as it may reach a terminal.
                reason=None if reason is None else protocol.escape_text(reason, 123),
                messages_in=peer.messages_in,
                bytes_in=peer.bytes_in,
                frames_out=peer.frames_out,
                bytes_out=peer.bytes_out,
                applied=peer.applied,
                delta_sum=peer.delta_sum,
                duplicates=peer.duplicates,
                refused=peer.refused,
                lagged=peer.lagged,
                clients=self.server.hub.clients,
            )

    def take(self, peer: Peer, texts: list[str]) -> int:
        """Adds read straight off the wire (connection.py), when the loop in handle() would
        apply them at once: how many of ``texts``, from the first, it took. handle() gets
        the rest as usual, from the first that is not an add.

        Only adds: anything that logs with the connection's context (a hello, a refusal of
        a malformed frame) must run in the connection's task, where that context is bound.
        A run of frames at a time, for one read's adds arrived together: one clock read,
        one hand-over to the batcher.
        """
        server = self.server
        if server.draining or peer.lagging or server.flow.blocked or peer.phase is Phase.WAITING:
            return 0
        parse = protocol.parse_json if peer.mode is Mode.JSON else _plain_add
        now = time.time()
        rate = server.config.rate_limit
        bucket: TokenBucket | None = None  # made at a connection's first add (budgets.py)
        tick = time.monotonic()
        ident, client, name = peer.id, peer.client, peer.name
        submissions: list[tuple[Peer, Submission]] = []
        append = submissions.append
        taken = size = 0
        try:
            for text in texts:
                try:
                    msg = parse(text)
                except ProtocolError:
                    break  # it and the rest: handle() refuses it, in the connection's context
                if type(msg) is not Add:
                    break
                taken += 1
                # isascii() is O(1) on CPython: the exact size of a frame, not encoded.
                size += len(text) if text.isascii() else len(text.encode())
                delta, req_id = msg
                if rate:
                    if bucket is None:
                        bucket = self._bucket(peer, rate)
                    if not bucket.take(rate, tick):
                        self._rate_limited(peer, rate, req_id, text)
                        continue
                # tuple.__new__ directly: a named tuple's own __new__ is a Python function.
                append((peer, _new(Submission, (delta, ident, now, client, name, req_id))))
        finally:
            # Even if a parse raised (the connection then closes with 1011): the adds
            # before it are applied, as they were when each frame was taken on its own.
            if taken:
                peer.messages_in += taken
                peer.bytes_in += size
                peer.greeted = True  # no hello after an add
                self.taken += taken
            if submissions:
                server.batcher.add_all(submissions)
        return taken

    def _on_message(self, peer: Peer, message: str | bytes) -> None:
        _count(peer, message)
        if isinstance(message, bytes):
            self.server.hub.release(peer)
            self._invalid(peer)
            self.refuse(
                peer,
                "binary_unsupported",
                "binary frames are not supported; send text",
                None,
                f"<{len(message)} bytes>",
            )
            return
        if peer.mode is Mode.PLAIN:
            try:
                delta = protocol.parse_plain(message)
            except ProtocolError as exc:
                self._invalid(peer)
                self.refuse(peer, exc.code, exc.message, None, message)
                return
            self._add(peer, delta, None, message)
            return
        try:
            msg = protocol.parse_json(message)
        except ProtocolError as exc:
            self.server.hub.release(peer)
            self._invalid(peer)
            self.refuse(peer, exc.code, exc.message, exc.req_id, message)
            return
        if peer.phase is Phase.WAITING:
            if isinstance(msg, Hello) and msg.since is not None and not peer.greeted:
                self.server.hub.cancel_hold(peer)  # the replay (recovery.py) answers instead
            else:
                self.server.hub.release(peer)
        if isinstance(msg, Add):
            peer.greeted = True
            self._add(peer, msg.delta, msg.req_id, message)
        elif peer.greeted:
            self.refuse(
                peer, "hello_late", "hello is only allowed once, before any add", None, message
            )
        else:
            peer.greeted = True
            peer.client = msg.client
            peer.name = msg.name
            structlog.contextvars.bind_contextvars(client=msg.client, name=msg.name)
            log.info("conn.hello", client=msg.client, name=msg.name, since=msg.since)
            if msg.since is not None and msg.epoch is not None:
                task = asyncio.ensure_future(
                    self.server.recovery.recover(peer, msg.since, msg.epoch)
                )
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    def _add(self, peer: Peer, delta: int, req_id: str | None, raw: str) -> None:
        rate = self.server.config.rate_limit
        if rate and not self._allowed(peer, rate, req_id, raw):
            return
        if self.server.draining:
            self.refuse(
                peer, "shutting_down", "the server is shutting down; not applied", req_id, raw
            )
            return
        # tuple.__new__ directly: a named tuple's own __new__ is a Python function (0.3 µs).
        submission = _new(Submission, (delta, peer.id, time.time(), peer.client, peer.name, req_id))
        self.server.batcher.add_all(((peer, submission),))

    def _allowed(self, peer: Peer, rate: float, req_id: str | None, raw: str) -> bool:
        """Spend one of ``peer``'s adds per second, or refuse this one (rate_limited)."""
        if self._bucket(peer, rate).take(rate, time.monotonic()):
            return True
        self._rate_limited(peer, rate, req_id, raw)
        return False

    @staticmethod
    def _bucket(peer: Peer, rate: float) -> TokenBucket:
        bucket = peer.adds
        if bucket is None:
            bucket = peer.adds = TokenBucket(rate, time.monotonic())
        return bucket

    def _rate_limited(self, peer: Peer, rate: float, req_id: str | None, raw: str) -> None:
        self.refuse(
            peer,
            "rate_limited",
            f"too many adds: at most {rate:g} per second per connection; not applied",
            req_id,
            raw,
        )

    def _invalid(self, peer: Peer) -> None:
        """Count a malformed frame; a connection sending them in a loop is closed (1008)."""
        limit = self.server.config.invalid_limit
        if not limit:
            return
        window = peer.invalid
        if window is None:
            window = peer.invalid = Window(time.monotonic())
        if not window.over(limit, time.monotonic):
            return
        ws = peer.ws
        if not isinstance(ws, TallyConnection):  # the server's connection class, always
            raise TypeError(f"not a TallyConnection: {type(ws).__name__}")
        ws.close_for_flood(f"too many invalid frames: at most {limit} per second", limit, "invalid")

    def refuse(self, peer: Peer, code: str, message: str, req_id: str | None, raw: str) -> None:
        peer.refused += 1
        self.refused += 1
        refused = self.server.tallies.refused
        refused[code] = refused.get(code, 0) + 1
        if peer.refused <= REFUSALS_LOGGED or self._debug:
            log.log(
                logging.INFO if peer.refused <= REFUSALS_LOGGED else logging.DEBUG,
                "update.refused",
                # Named in full: refusals also come from the batcher's task and from reads
                # taken straight off the wire, where the connection's context is not bound.
                **peer.context(),
                code=code,
                id=req_id,
                input=protocol.escape_text(raw, 80),
                refused=peer.refused,
            )
        if peer.mode is Mode.JSON:
            self.server.hub.send(peer, protocol.encode_error(code, message, req_id))
        else:
            self.server.hub.send(peer, protocol.encode_plain_error(message))


def _plain_add(text: str) -> Add:
    """A plain-mode frame as the add it is, or ProtocolError."""
    return _new(Add, (protocol.parse_plain(text), None))


def _count(peer: Peer, message: str | bytes) -> None:
    peer.messages_in += 1
    # isascii() is O(1) on CPython: the exact size of a str frame without encoding it.
    if isinstance(message, bytes) or message.isascii():
        peer.bytes_in += len(message)
    else:
        peer.bytes_in += len(message.encode())


def resynced(peer: Peer, lag: Lag, seq: int) -> None:
    # Called from the hub's callbacks, outside the connection's task: name it in full.
    log.info(
        "conn.resynced",
        **peer.context(),
        seq=seq,
        lagged=peer.lagged,
        missed=seq - lag.seq,
        lag_seconds=round(asyncio.get_running_loop().time() - lag.since, 3),
    )
