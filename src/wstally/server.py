"""``wstally serve``: the WebSocket endpoint, the per-connection handler and shutdown.

The handler only parses and applies; committing, acknowledging and broadcasting happen in
the committer and the hub, so the path of an add never waits on another client.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import resource
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from wstally import __version__, protocol
from wstally.committer import Committer
from wstally.hub import Hub, Mode, Peer
from wstally.protocol import SUBPROTOCOL, Add, ProtocolError
from wstally.store import MemoryStore, SQLiteStore, Store, StoreError
from wstally.tally import Duplicate, Refused, Tally, Update

__all__ = ["ServerConfig", "TallyServer", "run"]

log = structlog.get_logger("wstally.server")


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

    def open_store(self) -> Store:
        return MemoryStore() if self.memory else SQLiteStore(self.db)


class StartupError(Exception):
    """The server cannot start; the message tells the operator why."""


class TallyServer:
    def __init__(self, config: ServerConfig, store: Store | None = None) -> None:
        self.config = config
        self.store = store if store is not None else config.open_store()
        state = self.store.load(window=Tally(epoch="").window)
        self.tally = Tally(state.epoch, state.seq, state.total)
        for update in state.recent_ids:
            assert update.req_id is not None
            self.tally.remember(update.scope, update.req_id, update.seq, update.total)
        self.hub = Hub(
            epoch=state.epoch,
            seq=state.seq,
            total=state.total,
            buffer_limit=config.buffer_limit,
            flush_interval=config.flush_interval,
            on_resync=self._resynced,
        )
        self.committer = Committer(self.tally, self.store, self.hub)
        self.draining = False
        self.stopped = False
        self.started_at = time.time()
        self._server: Server | None = None

    # Lifecycle

    async def start(self) -> None:
        _raise_fd_limit()
        self.committer.start()
        cfg = self.config
        try:
            self._server = await serve(
                self._handle,
                cfg.host,
                cfg.port,
                subprotocols=[Subprotocol(SUBPROTOCOL)],
                select_subprotocol=_select_subprotocol,
                process_request=self._process_request,
                compression="deflate" if cfg.compression else None,
                max_size=protocol.MAX_FRAME,
                ping_interval=cfg.ping_interval,
                ping_timeout=cfg.ping_timeout,
                open_timeout=cfg.open_timeout,
                close_timeout=cfg.close_timeout,
                server_header=f"wstally/{__version__}",
                # asyncio's default backlog of 100 drops SYNs when thousands connect at once.
                backlog=4096,
            )
        except OSError as exc:
            self.committer.close()
            self.store.close()
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise StartupError(f"cannot listen on {cfg.host}:{cfg.port}: {reason}") from exc
        log.info(
            "server.started",
            url=self.url,
            host=cfg.host,
            port=self.port,
            store=self.store.description,
            epoch=self.tally.epoch,
            seq=self.tally.seq,
            total=self.tally.total,
            compression=cfg.compression,
            version=__version__,
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
        return f"ws://{host}:{self.port}/"

    async def stop(self) -> None:
        """Stop accepting, commit and deliver what is pending, then close everyone with 1001."""
        assert self._server is not None
        log.info(
            "server.stopping",
            clients=self.hub.clients,
            pending=self.tally.seq - self.tally.committed_seq,
        )
        self._server.server.close()
        self.draining = True
        await self.committer.drain()
        self.hub.flush(force=True)
        for peer in list(self.hub.peers):
            peer.drained.set()
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
        self.committer.close()
        self.store.close()
        self.stopped = True
        log.info(
            "server.stopped",
            seq=self.tally.seq,
            total=self.tally.total,
            epoch=self.tally.epoch,
            uptime=round(time.time() - self.started_at, 3),
        )

    # HTTP

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if "Upgrade" in request.headers:
            if path != "/":
                return conn.respond(
                    HTTPStatus.NOT_FOUND, "Not found: the WebSocket endpoint is /\n"
                )
            return None
        if path == "/healthz":
            body = {
                "status": "stopping" if self.draining else "ok",
                # Committed, hence acknowledged: a client that holds an ack finds it here,
                # even if the broadcast carrying it is still a few milliseconds away.
                "seq": self.tally.committed_seq,
                "total": self.tally.committed_total,
                "clients": self.hub.clients,
                "epoch": self.hub.epoch,
            }
            response = conn.respond(HTTPStatus.OK, json.dumps(body) + "\n")
            # Headers.__setitem__ appends: remove the text/plain type first.
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "application/json"
            return response
        return conn.respond(HTTPStatus.NOT_FOUND, "Not found: try /healthz, or / for WebSocket\n")

    # WebSocket

    async def _handle(self, ws: ServerConnection) -> None:
        mode = Mode.JSON if ws.subprotocol == SUBPROTOCOL else Mode.PLAIN
        peer = Peer(ws, mode, ws.id.hex[:12])
        addr = ws.remote_address
        structlog.contextvars.bind_contextvars(
            conn=peer.id, peer=f"{addr[0]}:{addr[1]}" if addr else None, mode=mode.value
        )
        opened = time.monotonic()
        self.hub.register(peer)
        log.info("conn.opened", clients=self.hub.clients)
        try:
            async for message in ws:
                if peer.lagging:
                    await _until_drained(peer, ws)
                self._on_message(peer, message)
        except ConnectionClosed:
            pass
        finally:
            self.hub.unregister(peer)
            log.info(
                "conn.closed",
                duration=round(time.monotonic() - opened, 3),
                code=ws.close_code,
                reason=ws.close_reason,
                messages_in=peer.messages_in,
                frames_out=peer.frames_out,
                bytes_out=peer.bytes_out,
                applied=peer.applied,
                refused=peer.refused,
                lagged=peer.lagged,
                clients=self.hub.clients,
            )

    def _on_message(self, peer: Peer, message: str | bytes) -> None:
        peer.messages_in += 1
        if isinstance(message, bytes):
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
                self._refuse(peer, exc.code, exc.message, None, message)
                return
            self._add(peer, delta, None, message)
            return
        try:
            msg = protocol.parse_json(message)
        except ProtocolError as exc:
            self._refuse(peer, exc.code, exc.message, exc.req_id, message)
            return
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
            log.info("conn.hello", client=msg.client, name=msg.name)

    def _add(self, peer: Peer, delta: int, req_id: str | None, raw: str) -> None:
        if self.draining:
            self._refuse(
                peer, "shutting_down", "the server is shutting down; not applied", req_id, raw
            )
            return
        result = self.tally.apply(
            delta,
            conn=peer.id,
            at=time.time(),
            client=peer.client,
            name=peer.name,
            req_id=req_id,
        )
        if type(result) is Update:
            peer.applied += 1
            self.committer.add(peer, result)
            log.debug("update.applied", seq=result.seq, delta=delta, total=result.total, id=req_id)
        elif type(result) is Duplicate:
            self.committer.duplicate(peer, result)
            log.debug("update.duplicate", id=req_id, seq=result.seq)
        else:
            assert type(result) is Refused
            self._refuse(peer, result.code, result.message, req_id, raw)

    def _refuse(self, peer: Peer, code: str, message: str, req_id: str | None, raw: str) -> None:
        peer.refused += 1
        log.info("update.refused", code=code, id=req_id, input=protocol.escape_text(raw, 80))
        if peer.mode is Mode.JSON:
            self.hub.send(peer, protocol.encode_error(code, message, req_id))
        else:
            self.hub.send(peer, protocol.encode_plain_error(message))

    def _resynced(self, peer: Peer) -> None:
        log.info("conn.resynced", conn=peer.id, seq=self.hub.seq, lagged=peer.lagged)


async def _until_drained(peer: Peer, ws: ServerConnection) -> None:
    # Also return when the connection closes, or the handler would never finish.
    drained = asyncio.ensure_future(peer.drained.wait())
    closed = asyncio.ensure_future(ws.wait_closed())
    await asyncio.wait([drained, closed], return_when=asyncio.FIRST_COMPLETED)
    drained.cancel()
    closed.cancel()


def _raise_fd_limit() -> None:
    # Each client is a file descriptor; the usual soft limit of 1024 is far below what one
    # server process handles.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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
    await stop.wait()
    await server.stop()
    return 0
