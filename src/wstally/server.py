"""``wstally serve``: the WebSocket endpoint, the per-connection handler and shutdown.

The handler only parses and applies; committing, acknowledging and broadcasting happen in
the batcher, the engine and the hub, so the path of an add never waits on another client.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import hmac
import json
import logging
import os
import resource
import signal
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Origin, Subprotocol

from wstally import __version__, logsetup, metrics, protocol
from wstally.batcher import MAX_BATCH, Batcher
from wstally.connection import FLOOD, TallyConnection, connection_class
from wstally.engine.base import (
    Engine,
    EngineError,
    FeedEvent,
    Position,
    Published,
    Submission,
)
from wstally.engine.local import LocalEngine
from wstally.flow import Flow
from wstally.hub import Hub, Mode, Peer
from wstally.metrics import Tallies
from wstally.protocol import SUBPROTOCOL, Add, Hello, ProtocolError
from wstally.stats import StatsLogger
from wstally.store import MemoryStore, SQLiteStore, Store, StoreError

__all__ = ["ServerConfig", "TallyServer", "run"]

log = logsetup.get_logger("wstally.server")

# A client sending garbage in a loop must not flood the log: the first refusals of each
# connection are logged at info, later ones at debug (conn.closed counts them all).
REFUSALS_LOGGED = 20


# A returning client gets at most this many missed updates replayed; further behind, it
# gets a snapshot. Chunks keep each replayed frame well under the client's frame limits.
MAX_RECOVERY = 100_000
# A new JSON connection's snapshot waits this long for its hello (or any first message),
# so that a returning client's replay can precede every live update. Send hello at once.
HELLO_WINDOW = 0.05
RECOVERY_CHUNK = protocol.UPDATES_PER_FRAME
# Replays read the store and encode on the loop: at most this many at once, so that 600
# clients asking for 100,000 updates each cannot crowd out the commits (and so the acks).
MAX_REPLAYS = 2
# Backlog (updates waiting to be committed, or to be broadcast) above which connections are
# no longer read, and below which reading resumes: see flow.py.
FLOW_HIGH = 4 * MAX_BATCH
FLOW_LOW = MAX_BATCH
# File descriptors kept free of connections (see _fd_capacity); a refusal for capacity is
# logged at most once per this many seconds, with the count since.
FD_RESERVE = 64
FULL_LOG_INTERVAL = 10.0


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    db: str = "wstally.db"
    memory: bool = False
    compression: bool = False
    buffer_limit: int = 256 * 1024
    flush_interval: float = 0.002
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    open_timeout: float | None = 10.0
    close_timeout: float | None = 10.0
    stats_interval: float = 10.0  # seconds between server.stats events; 0: none
    # Access: a shared secret, browser origins allowed, TLS.
    token: str | None = None
    allow_origins: list[str] | None = None
    certfile: str | None = None
    keyfile: str | None = None
    # Limits: connections, adds per second per connection (token bucket), slow consumers.
    max_connections: int = 20_000
    rate_limit: float = 10_000.0
    slow_timeout: float = 5.0
    # Frames per second per connection, every kind (pings included); past it: close 1008.
    # Twice the add rate limit, so that a client at the rate limit never gets near it.
    frame_limit: int = 20_000
    # Malformed frames per second per connection (each costs an error frame); past it: 1008.
    invalid_limit: int = 100
    # Several nodes, one total: the shared Redis engine instead of the local store.
    redis: str | None = None
    redis_prefix: str = "wstally"
    node: str | None = None  # this node's name in Redis and /healthz (default: host:pid)
    reuse_port: bool = False  # several processes serving one port (SO_REUSEPORT)

    def open_store(self) -> Store:
        return MemoryStore() if self.memory else SQLiteStore(self.db)

    def open_engine(self) -> Engine:
        if self.redis is not None:
            from wstally.engine.redis import RedisEngine

            return RedisEngine(self.redis, self.redis_prefix, node=self.node)
        return LocalEngine(self.open_store, "memory" if self.memory else "sqlite")


class StartupError(Exception):
    """The server cannot start; the message tells the operator why."""


class TallyServer:
    def __init__(
        self, config: ServerConfig, store: Store | None = None, engine: Engine | None = None
    ) -> None:
        self.config = config
        if engine is None:
            engine = LocalEngine(store) if store is not None else config.open_engine()
        self.engine = engine
        self.flow = Flow(high=FLOW_HIGH, low=FLOW_LOW)
        self._replays = asyncio.Semaphore(MAX_REPLAYS)
        # The hub's position comes from the engine's feed only (set in start()).
        self.hub = Hub(
            epoch="",
            seq=0,
            total=0,
            buffer_limit=config.buffer_limit,
            flush_interval=config.flush_interval,
            slow_timeout=config.slow_timeout,
            on_resync=self._resynced,
            flow=self.flow,
        )
        self.tallies = Tallies()
        self.batcher = Batcher(self.engine, self.hub, self.flow, self._refuse, self.tallies)
        self._metrics = metrics.registry_for(_MetricsView(self))
        self._feed_task: asyncio.Task[None] | None = None
        self.draining = False
        self.stopped = False
        self._tasks: set[asyncio.Future[None]] = set()
        self.started_at = time.time()
        self.capacity = config.max_connections
        self._full_refused = 0
        self._full_logged_at = -FULL_LOG_INTERVAL
        self._server: Server | None = None
        # Counters for server.stats (per connection or refusal, never per update).
        self.opened = 0
        self.closed = 0
        self.refused = 0
        self._stats_task: asyncio.Task[None] | None = None
        # Per-update events are debug: decide once whether to build them at all.
        self._debug = logsetup.enabled_for(logging.DEBUG)

    # Lifecycle

    async def start(self) -> None:
        _raise_fd_limit()
        if self.config.token:
            logsetup.redact(self.config.token)
        self.capacity = min(self.config.max_connections, _fd_capacity())
        if self.capacity < self.config.max_connections:
            # Past the fd limit, accept() fails and the loop resets new connections without
            # a word: refuse them with 503 before that, and say so now.
            log.warning(
                "server.fd_limit",
                max_connections=self.config.max_connections,
                capacity=self.capacity,
                fd_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            )
        cfg = self.config
        try:
            tls = _tls_context(cfg)
        except (OSError, ssl.SSLError) as exc:
            await self.engine.close()
            raise StartupError(_tls_problem(cfg, exc)) from exc
        # Listen first (not serving yet), then open the engine: a port already taken must
        # not leave a database file or a lock behind.
        try:
            self._server = await serve(
                self._handle,
                cfg.host,
                cfg.port,
                ssl=tls,
                # None admits clients that send no Origin (everything but browsers).
                origins=[*map(Origin, cfg.allow_origins), None] if cfg.allow_origins else None,
                subprotocols=[Subprotocol(SUBPROTOCOL)],
                select_subprotocol=_select_subprotocol,
                process_request=self._process_request,
                create_connection=connection_class(cfg.frame_limit),
                compression="deflate" if cfg.compression else None,
                max_size=protocol.MAX_FRAME,
                ping_interval=cfg.ping_interval,
                ping_timeout=cfg.ping_timeout,
                open_timeout=cfg.open_timeout,
                close_timeout=cfg.close_timeout,
                server_header=f"wstally/{__version__}",
                # asyncio's default backlog of 100 drops SYNs when thousands connect at once.
                backlog=4096,
                reuse_port=cfg.reuse_port or None,
                start_serving=False,
            )
        except OSError as exc:
            await self.engine.close()
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise StartupError(f"cannot listen on {cfg.host}:{cfg.port}: {reason}") from exc
        try:
            start = await self.engine.open()
        except BaseException as exc:
            self._server.close()
            await self.engine.close()
            if isinstance(exc, EngineError):
                engine = self.engine
                raise StartupError(
                    f"cannot open the {engine.name} engine at {engine.description}: {exc.message}"
                ) from exc
            raise
        self.hub.reset(start.epoch, start.seq, start.total)
        self.batcher.start(start.seq, start.total)
        # The feed runs in an empty context: what it logs is about no connection.
        self._feed_task = asyncio.get_running_loop().create_task(
            self._follow(), name="feed", context=contextvars.Context()
        )
        await self._server.server.start_serving()
        log.info(
            "server.started",
            url=self.url,
            host=cfg.host,
            port=self.port,
            engine=self.engine.name,
            store=self.engine.description,
            epoch=start.epoch,
            seq=start.seq,
            total=start.total,
            compression=cfg.compression,
            version=__version__,
            pid=os.getpid(),
            stats_interval=cfg.stats_interval,
        )
        if cfg.stats_interval > 0:
            stats = StatsLogger(self, cfg.stats_interval)
            # Its own empty context: no connection's fields on server-wide figures.
            self._stats_task = asyncio.get_running_loop().create_task(
                stats.run(), name="stats", context=contextvars.Context()
            )

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        scheme = "wss" if self.config.certfile else "ws"
        return f"{scheme}://{host}:{self.port}/"

    async def stop(self) -> None:
        """Stop accepting, commit and deliver what is pending, then close everyone with 1001."""
        assert self._server is not None
        log.info(
            "server.stopping",
            clients=self.hub.clients,
            pending=self.batcher.backlog,
        )
        self._server.server.close()
        self.draining = True
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
        await self._answer_what_was_read()
        await self.batcher.drain()
        await self._until_published()
        # Replays in progress would read from a store about to close.
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.hub.flush(force=True)
        for peer in list(self.hub.peers):
            peer.resume()
        for peer in list(self.hub.peers):
            if isinstance(peer.ws, TallyConnection):
                peer.ws.release_reading()
        self._server.close(close_connections=True)
        try:
            # A client that stopped reading never lets its close handshake through:
            # give everyone close_timeout, then drop whoever is left.
            async with asyncio.timeout((self.config.close_timeout or 10.0) + 1):
                await asyncio.shield(self._server.wait_closed())
        except TimeoutError:
            for peer in list(self.hub.peers):
                peer.ws.transport.abort()
            await self._server.wait_closed()
        self.hub.close()
        await self._close_engine()
        self.stopped = True
        log.info(
            "server.stopped",
            seq=self.hub.seq,
            total=self.hub.total,
            epoch=self.hub.epoch,
            uptime=round(time.time() - self.started_at, 3),
        )

    @property
    def position(self) -> Position:
        """The last update this node knows committed: acknowledged here, or published."""
        hub, batcher = self.hub, self.batcher
        if batcher.seq > hub.seq:
            return Position(hub.epoch, batcher.seq, batcher.total)
        return Position(hub.epoch, hub.seq, hub.total)

    async def _follow(self) -> None:
        """Hand every committed update, this node's and other nodes', to the hub in order."""
        async for event in self.engine.feed():
            try:
                self._on_feed(event)
            except Exception:
                # One bad event must not stop the broadcast for good: log it and go on.
                log.critical("feed.error", exc_info=True)

    def _on_feed(self, event: FeedEvent) -> None:
        if type(event) is Published:
            self.hub.publish(event.updates)
            return
        assert not isinstance(event, Published)
        position = event.position
        log.warning(
            "broadcast.reset",
            reason=event.reason,
            epoch=position.epoch,
            seq=position.seq,
            total=position.total,
            previous_epoch=self.hub.epoch,
            previous_seq=self.hub.seq,
        )
        self.batcher.seq, self.batcher.total = position.seq, position.total
        self.hub.restart(position.epoch, position.seq, position.total, event.reason)

    async def _until_published(self) -> None:
        # Everything acknowledged also goes out on the broadcast before the close frames.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        hub = self.hub
        while (hub.pending[-1].seq if hub.pending else hub.seq) < self.batcher.seq:
            if loop.time() > deadline:
                break
            await asyncio.sleep(0.001)

    async def _close_engine(self) -> None:
        self.batcher.close()
        if self._feed_task is not None:
            self._feed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feed_task
        await self.engine.close()

    async def _answer_what_was_read(self) -> None:
        """Stop reading; let every handler take the frames already read, so each add gets
        its answer (an ack, or ``shutting_down``) before the close frame, never after it."""
        peers = list(self.hub.peers)
        for peer in peers:
            if isinstance(peer.ws, TallyConnection):
                peer.ws.hold_reading()
            peer.resume()
        self.flow.release_all()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        # Polled: websockets' receive queue has no "empty" event to wait on.
        while loop.time() < deadline and any(  # noqa: ASYNC110
            isinstance(p.ws, TallyConnection) and p.ws.queued() for p in peers
        ):
            await asyncio.sleep(0.001)
        # One more turn: a handler that took the last frame answers it synchronously.
        await asyncio.sleep(0)

    # HTTP

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        problem = _header_problem(request)
        if problem is not None:
            return conn.respond(HTTPStatus.BAD_REQUEST, f"Bad request: {problem}\n")
        path = request.path.partition("?")[0]
        if "Upgrade" in request.headers:
            if path != "/":
                return conn.respond(
                    HTTPStatus.NOT_FOUND, "Not found: the WebSocket endpoint is /\n"
                )
            return self._admit(conn, request)
        if path == "/metrics":
            return self._metrics_response(conn, request)
        if path == "/healthz":
            status, body = self._health(request)
            response = conn.respond(status, json.dumps(body) + "\n")
            # Headers.__setitem__ appends: remove the text/plain type first.
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "application/json"
            return response
        # The live page (/, /app.js, /app.css): static, so it needs no token; its
        # WebSocket presents the ?token= the page was opened with.
        from wstally import web

        page = web.respond(conn, request)
        if page is not None:
            return page
        return conn.respond(HTTPStatus.NOT_FOUND, "Not found: try /healthz, or / for WebSocket\n")

    def _health(self, request: Request) -> tuple[HTTPStatus, dict[str, object]]:
        """503 while the store cannot commit; the details only for holders of the token."""
        engine = self.engine.status()
        degraded = engine.get("degraded")
        body: dict[str, object] = {
            "status": "degraded" if degraded else "stopping" if self.draining else "ok"
        }
        token = self.config.token
        if token is None or _presented(request, token):
            if degraded:
                body["reason"] = degraded
            position = self.position
            body.update(
                # Committed, hence acknowledged: a client that holds an ack finds it here,
                # even if the broadcast carrying it is still a few milliseconds away.
                seq=position.seq,
                total=position.total,
                clients=self.hub.clients,
                epoch=position.epoch,
                engine=engine,
                # For monitoring (and the load test): clients behind, and closed for it.
                lagging=len(self.hub.lagging),
                evicted=self.hub.evicted,
            )
        return (HTTPStatus.SERVICE_UNAVAILABLE if degraded else HTTPStatus.OK), body

    def _metrics_response(self, conn: ServerConnection, request: Request) -> Response:
        token = self.config.token
        if token is not None and not _presented(request, token):
            response = conn.respond(
                HTTPStatus.UNAUTHORIZED,
                "Unauthorized: /metrics needs the server's token "
                "('Authorization: Bearer <token>' or ?token=)\n",
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="wstally"'
            return response
        response = conn.respond(HTTPStatus.OK, "")
        response.body = metrics.render(self._metrics)
        del response.headers["Content-Type"]
        del response.headers["Content-Length"]
        response.headers["Content-Type"] = metrics.CONTENT_TYPE
        response.headers["Content-Length"] = str(len(response.body))
        return response

    def _admit(self, conn: ServerConnection, request: Request) -> Response | None:
        """Credentials, then capacity: refused here, a client never reaches the handler."""
        token = self.config.token
        if token is not None and not _presented(request, token):
            # Neither the expected nor the presented token is ever logged.
            response = conn.respond(
                HTTPStatus.UNAUTHORIZED,
                "Unauthorized: present the server's token as 'Authorization: Bearer <token>' "
                "or as the 'token' query parameter\n",
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="wstally"'
            return response
        if self.hub.clients >= self.capacity:
            self._log_full()
            return conn.respond(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"Service unavailable: {self.capacity} clients connected; try again later\n",
            )
        return None

    def _log_full(self) -> None:
        self._full_refused += 1
        now = time.monotonic()
        if now - self._full_logged_at >= FULL_LOG_INTERVAL:
            log.warning(
                "server.full",
                clients=self.hub.clients,
                capacity=self.capacity,
                refused=self._full_refused,
                fd_bound=self.capacity < self.config.max_connections,
            )
            self._full_logged_at = now
            self._full_refused = 0

    # WebSocket

    async def _handle(self, ws: ServerConnection) -> None:
        mode = Mode.JSON if ws.subprotocol == SUBPROTOCOL else Mode.PLAIN
        peer = Peer(ws, mode, logsetup.conn_id(ws))
        structlog.contextvars.bind_contextvars(**peer.context())
        opened = time.monotonic()
        self.opened += 1
        # Registered and unregistered in one try/finally: whatever fails in between, the
        # connection never stays counted (a leak once locked everyone out with 503s).
        try:
            self.hub.register(peer, hold=HELLO_WINDOW)
            agent = _first_header(ws.request, "User-Agent")
            log.info(
                "conn.opened",
                clients=self.hub.clients,
                user_agent=None if agent is None else protocol.escape_text(agent, 80),
            )
            flow = self.flow
            async for message in ws:
                if self.draining and ws.protocol.state is not State.OPEN:
                    # Read after our close frame went out (the close handshake needs
                    # reading): it cannot be answered, and the client knows to resend it.
                    break
                if peer.lagging:
                    await _until_drained(peer, ws)
                if flow.blocked:
                    await flow.wait()
                self._on_message(peer, message)
        except ConnectionClosed:
            pass
        finally:
            self.hub.unregister(peer)
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
                duplicates=peer.duplicates,
                refused=peer.refused,
                lagged=peer.lagged,
                clients=self.hub.clients,
            )

    def _on_message(self, peer: Peer, message: str | bytes) -> None:
        peer.messages_in += 1
        # isascii() is O(1) on CPython: the exact size of a str frame without encoding it.
        if isinstance(message, bytes) or message.isascii():
            peer.bytes_in += len(message)
        else:
            peer.bytes_in += len(message.encode())
        if isinstance(message, bytes):
            self.hub.release(peer)
            self._invalid(peer)
            self._refuse(
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
                self._refuse(peer, exc.code, exc.message, None, message)
                return
            self._add(peer, delta, None, message)
            return
        try:
            msg = protocol.parse_json(message)
        except ProtocolError as exc:
            self.hub.release(peer)
            self._invalid(peer)
            self._refuse(peer, exc.code, exc.message, exc.req_id, message)
            return
        if peer.hold is not None:
            if isinstance(msg, Hello) and msg.since is not None:
                self.hub.cancel_hold(peer)  # the replay below answers instead of a snapshot
            else:
                self.hub.release(peer)
        if isinstance(msg, Add):
            peer.greeted = True
            self._add(peer, msg.delta, msg.req_id, message)
        elif peer.greeted:
            self._refuse(
                peer, "hello_late", "hello is only allowed once, before any add", None, message
            )
        else:
            peer.greeted = True
            peer.client = msg.client
            peer.name = msg.name
            structlog.contextvars.bind_contextvars(client=msg.client, name=msg.name)
            log.info("conn.hello", client=msg.client, name=msg.name, since=msg.since)
            if msg.since is not None and msg.epoch is not None:
                task = asyncio.ensure_future(self._recover(peer, msg.since, msg.epoch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _recover(self, peer: Peer, since: int, epoch: str) -> None:
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
        peer.recovering = True
        try:
            await self._replay(peer, since)
        finally:
            peer.recovering = False

    async def _replay(self, peer: Peer, since: int) -> None:
        hub = self.hub
        ws = peer.ws
        epoch = hub.epoch
        replayed = 0
        cursor = since
        # A chunk at a time: commits (and so acks) take turns with the reads on the store's
        # thread, and the loop is never held for more than one chunk's encoding.
        while cursor < hub.seq:
            # Reading and encoding are bounded (MAX_REPLAYS at once); waiting for a client
            # to read is not, so a client that never reads cannot hold up anyone's replay.
            async with self._replays:
                try:
                    batch = await self.engine.history(cursor, min(hub.seq - cursor, RECOVERY_CHUNK))
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
            if peer.lagging:
                await _until_drained(peer, ws)
        hub.send(peer, hub.snapshot(peer, recovered=True))
        self.tallies.replays["recovered"] += 1
        log.info("conn.recovered", since=since, updates=replayed, seq=hub.seq)

    def _not_recovered(self, peer: Peer, since: int, reason: str) -> None:
        self.tallies.replays["not_recovered"] += 1
        # The snapshot is the current position: live updates continue from it.
        self.hub.send(peer, self.hub.snapshot(peer, recovered=False, reason=reason))
        peer.recovering = False
        log.info("conn.not_recovered", since=since, reason=reason, seq=self.hub.seq)

    def _add(self, peer: Peer, delta: int, req_id: str | None, raw: str) -> None:
        rate = self.config.rate_limit
        if rate:
            now = time.monotonic()
            # A second's worth of burst (at least one add); refilled continuously.
            tokens = min(max(rate, 1.0), peer.bucket + (now - peer.bucket_at) * rate)
            peer.bucket_at = now
            if tokens < 1.0:
                peer.bucket = tokens
                self._refuse(
                    peer,
                    "rate_limited",
                    f"too many adds: at most {rate:g} per second per connection; not applied",
                    req_id,
                    raw,
                )
                return
            peer.bucket = tokens - 1.0
        if self.draining:
            self._refuse(
                peer, "shutting_down", "the server is shutting down; not applied", req_id, raw
            )
            return
        self.batcher.add(
            peer, Submission(delta, peer.id, time.time(), peer.client, peer.name, req_id)
        )

    def _invalid(self, peer: Peer) -> None:
        """Count a malformed frame; a connection sending them in a loop is closed (1008)."""
        limit = self.config.invalid_limit
        if not limit:
            return
        peer.invalid += 1
        if peer.invalid <= limit:
            return
        now = time.monotonic()
        if now - peer.invalid_at >= 1.0:
            peer.invalid_at = now
            peer.invalid = 1
            return
        ws = peer.ws
        if ws.protocol.state is State.OPEN:
            log.warning("conn.flood", limit=limit, kind="invalid")
            ws.protocol.fail(FLOOD, f"too many invalid frames: at most {limit} per second")
            ws.send_data()
            asyncio.get_running_loop().call_later(1.0, ws.transport.abort)

    def _refuse(self, peer: Peer, code: str, message: str, req_id: str | None, raw: str) -> None:
        peer.refused += 1
        self.refused += 1
        refused = self.tallies.refused
        refused[code] = refused.get(code, 0) + 1
        if peer.refused <= REFUSALS_LOGGED or self._debug:
            log.log(
                logging.INFO if peer.refused <= REFUSALS_LOGGED else logging.DEBUG,
                "update.refused",
                code=code,
                id=req_id,
                input=protocol.escape_text(raw, 80),
                refused=peer.refused,
            )
        if peer.mode is Mode.JSON:
            self.hub.send(peer, protocol.encode_error(code, message, req_id))
        else:
            self.hub.send(peer, protocol.encode_plain_error(message))

    def _resynced(self, peer: Peer) -> None:
        # Called from the hub's callbacks, outside the connection's task: name it in full.
        hub = self.hub
        log.info(
            "conn.resynced",
            **peer.context(),
            seq=hub.seq,
            lagged=peer.lagged,
            missed=hub.seq - peer.lag_seq,
            lag_seconds=round(asyncio.get_running_loop().time() - peer.lag_since, 3),
        )


class _MetricsView:
    """What /metrics reads of a server: its counters, never its internals' structure."""

    def __init__(self, server: TallyServer) -> None:
        self.server = server

    def figures(self) -> dict[str, float]:
        server = self.server
        hub, batcher = server.hub, server.batcher
        return {
            "adds_applied": batcher.committed,
            "adds_duplicate": batcher.duplicates,
            "deliveries": hub.deliveries,
            "sent_bytes": hub.bytes_sent,
            "lagging_connections": len(hub.lagging),
            "lag_episodes": hub.skipped,
            "evicted": hub.evicted,
            "connections_opened": server.opened,
            "flow_blocked": server.flow.blocks,
            "seq": server.position.seq,
            "engine_up": 0 if server.engine.status().get("degraded") else 1,
        }

    def connections(self) -> dict[str, int]:
        return {mode.value: count for mode, count in self.server.hub.by_mode.items()}

    def engine(self) -> dict[str, str]:
        status = self.server.engine.status()
        return {k: str(status[k]) for k in ("engine", "node") if k in status}

    def tallies(self) -> Tallies:
        return self.server.tallies


async def _until_drained(peer: Peer, ws: ServerConnection) -> None:
    # Also return when the connection closes, or the handler would never finish.
    if peer.drained is None:
        return
    drained = asyncio.ensure_future(peer.drained.wait())
    closed = asyncio.ensure_future(ws.wait_closed())
    await asyncio.wait([drained, closed], return_when=asyncio.FIRST_COMPLETED)
    drained.cancel()
    closed.cancel()


def _reopen_logs() -> None:
    files = logsetup.reopen()
    log.info("server.logs_reopened", signal="SIGHUP", files=files)


def _fd_capacity() -> int:
    """Connections this process can hold: its file descriptor limit, less a reserve for
    the store, the log file and the handshakes in progress."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(soft - FD_RESERVE, 1)


def _raise_fd_limit() -> None:
    # Each client is a file descriptor; the usual soft limit of 1024 is far below what one
    # server process handles.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# Headers the server (or websockets after it) reads as one value: a repeated one is refused
# with 400 up front, before anything reads it and trips over the ambiguity.
SINGLE_HEADERS = (
    "Authorization",
    "Host",
    "Origin",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "User-Agent",
)


def _header_problem(request: Request) -> str | None:
    headers = request.headers
    for name in SINGLE_HEADERS:
        if len(headers.get_all(name)) > 1:
            return f"the {name} header is repeated; send it once"
    return None


def _first_header(request: Request | None, name: str) -> str | None:
    """A header's value, or None; never raises, whatever the client sent."""
    if request is None:
        return None
    values = request.headers.get_all(name)
    return values[0] if values else None


def _presented(request: Request, token: str) -> bool:
    expected = token.encode()
    header = _first_header(request, "Authorization") or ""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), expected):
        return True
    # Browsers cannot set headers on a WebSocket handshake: accept ?token= too.
    query = parse_qs(urlsplit(request.path).query)
    return any(hmac.compare_digest(v.encode(), expected) for v in query.get("token", []))


def _tls_problem(cfg: ServerConfig, exc: Exception) -> str:
    """Which file, and what is wrong with it: the operator's next step."""
    name = getattr(exc, "filename", None)
    files = f"{cfg.certfile}" + (f" / {cfg.keyfile}" if cfg.keyfile else "")
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot load the TLS certificate or key {name or files}: {exc.strerror}"
    return f"cannot load the TLS certificate or key ({files}): {exc}"


def _tls_context(cfg: ServerConfig) -> ssl.SSLContext | None:
    if cfg.certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cfg.certfile, cfg.keyfile)
    return context


def _select_subprotocol(
    conn: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    # The default would refuse clients that offer nothing: those are plain-mode clients.
    if not offered:
        return None
    if SUBPROTOCOL in offered:
        return Subprotocol(SUBPROTOCOL)
    raise NegotiationError(
        f"unsupported subprotocol {protocol.escape_text(', '.join(offered))}; "
        f"this server speaks {SUBPROTOCOL} "
        "or plain text (offer no subprotocol)"
    )


async def run(config: ServerConfig) -> int:
    """Serve until SIGINT/SIGTERM; a second signal forces an immediate exit."""
    try:
        server = TallyServer(config)
        await server.start()
    except (StoreError, StartupError) as exc:
        log.error("server.failed", error=str(exc))
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("server.forced_exit", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("server.signal", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    # The Unix convention for daemons: SIGHUP reopens the log file (after logrotate moved
    # it away) and the server keeps serving; its default action would end the process.
    loop.add_signal_handler(signal.SIGHUP, _reopen_logs)
    await stop.wait()
    await server.stop()
    return 0
