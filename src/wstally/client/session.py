"""A reconnecting ``wstally.v1`` session, free of any user interface.

It owns the outbox of adds not yet acknowledged: they are resent with the same ids after
every reconnect, with the same hello client id, so the server's deduplication makes each
add count exactly once however often the connection drops. What happens is reported to the
UI as events; the UI never touches the socket.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import ssl
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from wstally import protocol
from wstally.client.events import (
    Acked,
    Event,
    Item,
    Paced,
    Presence,
    Refused,
    Snapshot,
    State,
    Updates,
)
from wstally.client.failures import describe, handshake_refusal
from wstally.client.pacing import Pacer
from wstally.protocol import (
    SUBPROTOCOL,
    AckMsg,
    ErrorMsg,
    PresenceMsg,
    SnapshotMsg,
    UpdatesMsg,
)
from wstally.text import escape_text

__all__ = ["Session"]


T = TypeVar("T")

# Refusals that say "not now" rather than "never": keep the add and resend it.
TRANSIENT = frozenset({"shutting_down", "store_failed", "rate_limited", "unavailable"})
RETRY_TRANSIENT = 0.5  # seconds before such an add is sent again (rate_limited: the Pacer)


# Handshake refusals that retrying cannot cure (credentials, origin, path), and what they
# mean; any other 4xx is final too, a 5xx (503: the server is full) is retried.
class Session:
    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        client_id: str | None = None,
        on_event: Callable[[Event], None] = lambda event: None,
        backoff: tuple[float, float] = (0.1, 5.0),
        open_timeout: float = 10.0,
        cafile: str | None = None,
        token: str | None = None,
    ) -> None:
        self.url = url
        # wss:// is verified against the system's CAs, or against cafile when given.
        self.ssl = ssl.create_default_context(cafile=cafile) if url.startswith("wss:") else None
        self.headers = {"Authorization": f"Bearer {token}"} if token else None
        self.name = _printable_name(name) if name else None
        self.client_id = client_id or secrets.token_hex(8)
        self.on_event = on_event
        self.backoff = backoff
        self.open_timeout = open_timeout
        self.outbox: OrderedDict[str, int] = OrderedDict()
        self.own_seqs: set[int] = set()
        self.state = "connecting"
        self.epoch: str | None = None
        self.seq = 0
        self.total = 0
        self.clients: int | None = None  # known only while connected
        self.acked = 0
        self.refused = 0
        self.error: str | None = None  # why the last connection attempt or connection ended
        self.fatal = False  # the server refused us for good (a 4xx handshake answer)
        self.pacer = Pacer()
        self.connected_once = asyncio.Event()
        self._next_id = 0
        self._ws: ClientConnection | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._closer: asyncio.Future[None] | None = None
        self._recovering = False
        self._since = 0  # the seq we asked to recover from
        # Ids to send on the current connection, refused ones first; and when each was sent.
        self._retry: deque[str] = deque()
        self._ready: deque[str] = deque()
        self._sent_at: dict[str, float] = {}
        self._settled = asyncio.Event()
        self._settled.set()

    # Used by the UI

    def add(self, delta: int) -> str:
        """Queue an add; it is sent now if connected, or as soon as we are."""
        self._next_id += 1
        req_id = str(self._next_id)
        self.outbox[req_id] = delta
        self._ready.append(req_id)
        self._settled.clear()
        self._wake.set()
        return req_id

    async def settled(self) -> None:
        """Wait until every add so far has been acknowledged or refused."""
        await self._settled.wait()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._ws is not None:
            self._closer = asyncio.ensure_future(self._ws.close())

    async def run_beside(self, work: Coroutine[Any, Any, T]) -> T | None:
        """Run the session and ``work`` side by side; whichever ends first ends the other.

        Returns what ``work`` returned, or None when the session ended first.
        """
        runner = asyncio.ensure_future(self.run())
        worker = asyncio.ensure_future(work)
        try:
            await asyncio.wait([runner, worker], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.close()
            worker.cancel()
            await asyncio.gather(runner, worker, return_exceptions=True)
        if worker.done() and not worker.cancelled() and worker.exception() is None:
            return worker.result()
        for task in (runner, worker):
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return None

    # The connection loop

    async def run(self) -> None:
        """Connect, serve, and reconnect with backoff until close() is called."""
        attempt = 0
        while not self._closing:
            self._emit(State("connecting" if attempt == 0 else "reconnecting"))
            try:
                ws = await self._connect()
            except InvalidStatus as exc:
                self.error, self.fatal = handshake_refusal(exc, token=self.headers is not None)
            except InvalidURI as exc:
                self.error, self.fatal = f"not a WebSocket URL: {exc}", True
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                self.error = describe(exc)
            else:
                attempt = 0
                self.error = await self._connected(ws)
            if self.fatal:
                self._emit(State("closed", error=self.error))
                return
            if self._closing:
                break
            attempt += 1
            low, high = self.backoff
            # Exponential backoff with full jitter: a restarted server is not stampeded.
            delay = random.uniform(low, min(high, low * 2**attempt))
            self._emit(State("reconnecting", retry_in=delay, error=self.error))
            await self._sleep(delay)
        self._emit(State("closed"))

    async def _connect(self) -> ClientConnection:
        async with asyncio.timeout(self.open_timeout):
            return await connect(
                self.url,
                subprotocols=[SUBPROTOCOL],
                open_timeout=None,
                ssl=self.ssl,
                additional_headers=self.headers,
            )

    async def _connected(self, ws: ClientConnection) -> str:
        """Serve one connection to its end; why it ended."""
        try:
            await self._serve(ws)
            reason = f" {ws.close_reason}" if ws.close_reason else ""
            return f"server closed the connection ({ws.close_code}{reason})"
        except ConnectionClosed as exc:
            return describe(exc)
        finally:
            self._ws = None
            self.clients = None  # not known again until the next snapshot
            await ws.close()

    async def _sleep(self, delay: float) -> None:
        self._wake.clear()
        try:
            async with asyncio.timeout(delay):
                while not self._closing:
                    await self._wake.wait()
                    self._wake.clear()
        except TimeoutError:
            pass

    async def _serve(self, ws: ClientConnection) -> None:
        # Hello goes first, before anything is read: the server holds the snapshot (or,
        # for a returning client, the replay of what it missed) until it has seen it.
        hello: dict[str, Any] = {"type": "hello", "client": self.client_id}
        if self.name:
            hello["name"] = self.name
        if self.epoch is not None:
            # Coming back: ask for what we missed. The server replays it, then confirms
            # with a snapshot marked "recovered".
            hello["since"] = self._since = self.seq
            hello["epoch"] = self.epoch
            self._recovering = True
        await ws.send(json.dumps(hello))
        self._ws = ws
        self.state = "connected"
        self._emit(State("connected"))
        self.connected_once.set()
        # Receive and send as two tasks owned here: either ending ends the other, and
        # neither outlives this connection.
        tasks = [
            asyncio.ensure_future(self._receive(ws)),
            asyncio.ensure_future(self._send(ws)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if exc is not None:
                raise exc

    async def _send(self, ws: ClientConnection) -> None:
        # Everything unacked goes out again, in order, with its original id; adds refused
        # as too many per second go first, at the pace the server accepts.
        self._retry.clear()
        self._sent_at.clear()
        self._ready = deque(self.outbox)
        loop = asyncio.get_running_loop()
        while not self._closing:
            queue = self._next_queue()
            if queue is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = loop.time()
            wait = self.pacer.delay(now)
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            req_id = queue.popleft()
            self.pacer.sent(now)
            self._sent_at[req_id] = now
            await ws.send(json.dumps({"type": "add", "delta": self.outbox[req_id], "id": req_id}))

    def _next_queue(self) -> deque[str] | None:
        """The queue whose first id goes next, skipping ids answered meanwhile."""
        for queue in (self._retry, self._ready):
            while queue and queue[0] not in self.outbox:
                queue.popleft()
            if queue:
                return queue
        return None

    async def _receive(self, ws: ClientConnection) -> None:
        async for raw in ws:
            if isinstance(raw, bytes):
                continue
            try:
                msg = protocol.decode_server(raw)
            except (ValueError, KeyError, TypeError):
                continue  # a frame we cannot read is not worth the connection
            if isinstance(msg, UpdatesMsg):
                self._on_updates(msg)
            elif isinstance(msg, AckMsg):
                self._on_ack(msg)
            elif isinstance(msg, SnapshotMsg):
                self._on_snapshot(msg)
            elif isinstance(msg, ErrorMsg):
                self._on_error(msg)
            elif isinstance(msg, PresenceMsg):
                self._on_presence(msg)

    # Server messages

    def _on_snapshot(self, msg: SnapshotMsg) -> None:
        if self._recovering:
            if msg.recovered is None:
                return  # the connect-time snapshot: the replay follows
            self._recovering = False
            if msg.recovered and msg.seq == self.seq:
                self.clients = msg.clients
                replayed = self.seq - self._since
                snapshot = Snapshot(self.epoch or "", self.seq, self.total, self.clients)
                self._emit(replace(snapshot, recovered=True, replayed=replayed))
                return
        missed = None
        new_history = self.epoch is not None and msg.epoch != self.epoch
        if self.epoch is not None and not new_history and msg.seq > self.seq:
            missed = (self.seq + 1, msg.seq)
        self.epoch = msg.epoch
        self.seq, self.total = msg.seq, msg.total
        self.clients = msg.clients
        self._emit(Snapshot(self.epoch, self.seq, self.total, self.clients, missed, new_history))

    def _on_updates(self, msg: UpdatesMsg) -> None:
        # Only what continues our position counts: during a replay, a live frame that got
        # ahead of it is dropped (the replay covers it); a repeat is dropped too.
        items: list[Item] = []
        seq = self.seq
        for i in msg.items:
            if i.seq == seq + 1 or (not self._recovering and i.seq > seq):
                items.append(Item(i.seq, i.delta, i.total, i.by))
                seq = i.seq
        if not items:
            return
        self.seq, self.total = items[-1].seq, items[-1].total
        own = frozenset(i.seq for i in items if i.seq in self.own_seqs)
        self._emit(Updates(tuple(items), own))

    def _on_ack(self, msg: AckMsg) -> None:
        req_id = msg.req_id
        delta = self.outbox.pop(req_id, None)
        if delta is None:
            return  # an answer to a resend we already had
        self._sent_at.pop(req_id, None)
        self.acked += 1
        self.own_seqs.add(msg.seq)
        self._emit(Acked(req_id, delta, msg.seq, msg.total, msg.duplicate))
        self._check_settled()

    def _on_error(self, msg: ErrorMsg) -> None:
        code, message, req_id = msg.code, msg.message, msg.req_id
        if req_id is None or req_id not in self.outbox:
            # Not about an add of ours still waiting: a bad frame, or a late answer.
            self._emit(Refused(code, message, req_id, None))
            return
        sent_at = self._sent_at.pop(req_id, None)
        if code == "rate_limited":
            self._slow_down(req_id, sent_at)
        elif code in TRANSIENT:
            # "Not now": send it again shortly, same id, on this connection or the next.
            asyncio.get_running_loop().call_later(RETRY_TRANSIENT, self._resend, req_id)
            self._emit(Refused(code, message, req_id, None))
        else:
            self.refused += 1
            self._emit(Refused(code, message, req_id, self.outbox.pop(req_id)))
            self._check_settled()

    def _slow_down(self, req_id: str, sent_at: float | None) -> None:
        # Too many per second: nothing was applied. Resend it first, at a slower pace.
        now = asyncio.get_running_loop().time()
        if self.pacer.refused(now if sent_at is None else sent_at, now):
            self._emit(Paced(self.pacer.rate(now) or 0.0))
        self._resend(req_id)

    def _on_presence(self, msg: PresenceMsg) -> None:
        self.clients = msg.clients
        self._emit(Presence(self.clients))

    def _resend(self, req_id: str) -> None:
        if req_id in self.outbox:
            self._retry.append(req_id)
            self._wake.set()

    def _check_settled(self) -> None:
        if not self.outbox:
            self._settled.set()

    def _emit(self, event: Event) -> None:
        if isinstance(event, State):
            self.state = event.state
        self.on_event(event)


def _printable_name(name: str) -> str:
    # The server refuses names it could not show safely; escape ours so it is accepted.
    return escape_text(name, 32)[:32]
