"""``wstally serve``: the WebSocket endpoint, the per-connection handler and shutdown.

The handler only parses and applies; committing, acknowledging and broadcasting happen in
the batcher, the engine and the hub, so the path of an add never waits on another client.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import os
import resource
import ssl
import time

from websockets.asyncio.server import Server, serve
from websockets.typing import Origin, Subprotocol

from wstally import __version__, logsetup, protocol
from wstally.batcher import MAX_BATCH, Batcher
from wstally.config import ServerConfig
from wstally.connection import TallyConnection, connection_class
from wstally.endpoints import Endpoints, select_subprotocol
from wstally.engine.base import (
    Engine,
    EngineError,
    FeedEvent,
    Position,
    Published,
)
from wstally.engine.local import LocalEngine
from wstally.fdlimit import raise_fd_limit as _raise_fd_limit
from wstally.flow import Flow
from wstally.handler import Handler, resynced
from wstally.hub import Hub
from wstally.metrics import Tallies
from wstally.penalty import Penalties
from wstally.protocol import SUBPROTOCOL
from wstally.recovery import Recovery
from wstally.stats import StatsLogger
from wstally.store import Store
from wstally.view import ServerView

__all__ = ["ServerConfig", "StartupError", "TallyServer"]

log = logsetup.get_logger("wstally.server")

# Backlog (updates waiting to be committed, or to be broadcast) above which connections are
# no longer read, and below which reading resumes: see flow.py.
FLOW_HIGH = 4 * MAX_BATCH
FLOW_LOW = MAX_BATCH
# File descriptors kept free of connections (see _fd_capacity).
FD_RESERVE = 64


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
        # The hub's position comes from the engine's feed only (set in start()).
        self.hub = Hub(
            epoch="",
            seq=0,
            total=0,
            buffer_limit=config.buffer_limit,
            flush_interval=config.flush_interval,
            slow_timeout=config.slow_timeout,
            on_resync=resynced,
            flow=self.flow,
        )
        self.tallies = Tallies(enabled=config.metrics)
        self.handler = Handler(self)
        self.batcher = Batcher(self.engine, self.hub, self.flow, self.handler.refuse, self.tallies)
        self._feed_task: asyncio.Task[None] | None = None
        self.draining = False
        self.stopped = False
        self.started_at = time.time()
        self.capacity = config.max_connections
        self._server: Server | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self.view = ServerView(self)
        self.recovery = Recovery(self.hub, self.engine, self.tallies)
        self.endpoints = Endpoints(self)

    # Lifecycle

    async def start(self) -> None:
        """Listen, open the engine, then serve: in that order, so that a port already taken
        leaves no database file or lock behind."""
        _raise_fd_limit()
        if self.config.token:
            logsetup.redact(self.config.token)
        self._set_capacity()
        try:
            tls = _tls_context(self.config)
        except (OSError, ssl.SSLError) as exc:
            await self.engine.close()
            raise StartupError(_tls_problem(self.config, exc)) from exc
        self._server = await self._listen(tls)
        start = await self._open_engine(self._server)
        self.hub.reset(start.epoch, start.seq, start.total)
        self.batcher.start(start.seq, start.total)
        # The feed runs in an empty context: what it logs is about no connection.
        self._feed_task = asyncio.get_running_loop().create_task(
            self._follow(), name="feed", context=contextvars.Context()
        )
        await self._server.server.start_serving()
        self._log_started(start)
        if self.config.stats_interval > 0:
            stats = StatsLogger(self.view, self.config.stats_interval)
            # Its own empty context: no connection's fields on server-wide figures.
            self._stats_task = asyncio.get_running_loop().create_task(
                stats.run(), name="stats", context=contextvars.Context()
            )

    def _set_capacity(self) -> None:
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

    async def _listen(self, tls: ssl.SSLContext | None) -> Server:
        """Bind the port, not serving yet."""
        cfg = self.config
        try:
            return await serve(
                self.handler.handle,
                cfg.host,
                cfg.port,
                ssl=tls,
                # None admits clients that send no Origin (everything but browsers).
                origins=[*map(Origin, cfg.allow_origins), None] if cfg.allow_origins else None,
                subprotocols=[Subprotocol(SUBPROTOCOL)],
                select_subprotocol=select_subprotocol,
                process_request=self.endpoints.process_request,
                create_connection=connection_class(
                    cfg.frame_limit,
                    Penalties(cfg.flood_ban) if cfg.flood_ban else None,
                    self.handler.take,
                ),
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

    async def _open_engine(self, server: Server) -> Position:
        engine = self.engine
        try:
            return await engine.open()
        except BaseException as exc:
            server.close()
            await engine.close()
            if isinstance(exc, EngineError):
                raise StartupError(
                    f"cannot open the {engine.name} engine at {engine.description}: {exc.message}"
                ) from exc
            raise

    def _log_started(self, start: Position) -> None:
        cfg = self.config
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
        await self.handler.cancel_replays()
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
        while hub.seq < self.batcher.seq:
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
            self.hub.laggards.release(peer)
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


def _fd_capacity() -> int:
    """Connections this process can hold: its file descriptor limit, less a reserve for
    the store, the log file and the handshakes in progress."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(soft - FD_RESERVE, 1)


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
