"""The HTTP side of the one port: admission of WebSocket handshakes, /healthz, /metrics and
the live page, and the headers read on the way.

Everything here runs in websockets' ``process_request``, before a connection exists: it
answers or admits, and never raises on what a client sent (a repeated header is a 400, not
a traceback that could carry a secret into the log).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Sequence
from http import HTTPStatus
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import NegotiationError
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from wstally import logsetup, metrics, protocol, web
from wstally.config import ServerConfig
from wstally.engine.base import Engine, Position
from wstally.hub import Hub
from wstally.protocol import SUBPROTOCOL
from wstally.view import ServerView


class Host(Protocol):
    """The parts of a server the endpoints read (a TallyServer is one)."""

    config: ServerConfig
    engine: Engine
    hub: Hub
    draining: bool
    capacity: int
    view: ServerView

    @property
    def position(self) -> Position: ...


__all__ = [
    "FULL_LOG_INTERVAL",
    "SINGLE_HEADERS",
    "Endpoints",
    "Host",
    "first_header",
    "presented",
    "select_subprotocol",
]

log = logsetup.get_logger("wstally.server")

# A refusal for capacity is logged at most once per this many seconds, with the count since.
FULL_LOG_INTERVAL = 10.0

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


class Endpoints:
    """Answers plain HTTP requests and admits (or refuses) WebSocket handshakes."""

    def __init__(self, server: Host) -> None:
        self.server = server
        self.metrics = metrics.registry_for(server.view)
        self._full_refused = 0
        self._full_logged_at = -FULL_LOG_INTERVAL

    def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        problem = _header_problem(request)
        if problem is not None:
            return conn.respond(HTTPStatus.BAD_REQUEST, f"Bad request: {problem}\n")
        path = request.path.partition("?")[0]
        if "Upgrade" in request.headers:
            if path != "/":
                return conn.respond(
                    HTTPStatus.NOT_FOUND, "Not found: the WebSocket endpoint is /\n"
                )
            return self.admit(conn, request)
        if path == "/metrics" and self.server.config.metrics:
            return self.metrics_response(conn, request)
        if path == "/healthz":
            status, body = self.health(request)
            return _json(conn, status, body)
        # The live page (/, /app.js, /app.css): static, so it needs no token; its
        # WebSocket presents the ?token= the page was opened with.
        page = web.respond(conn, request)
        if page is not None:
            return page
        return conn.respond(HTTPStatus.NOT_FOUND, "Not found: try /healthz, or / for WebSocket\n")

    def health(self, request: Request) -> tuple[HTTPStatus, dict[str, object]]:
        """503 while the engine cannot commit; the details only for holders of the token."""
        server = self.server
        engine = server.engine.status()
        degraded = engine.get("degraded")
        body: dict[str, object] = {
            "status": "degraded" if degraded else "stopping" if server.draining else "ok"
        }
        token = server.config.token
        if token is None or presented(request, token):
            if degraded:
                body["reason"] = degraded
            position = server.position
            hub = server.hub
            body.update(
                # Committed, hence acknowledged: a client that holds an ack finds it here,
                # even if the broadcast carrying it is still a few milliseconds away.
                seq=position.seq,
                total=position.total,
                clients=hub.clients,
                epoch=position.epoch,
                engine=engine,
                # For monitoring (and the load test): clients behind, and closed for it.
                lagging=len(hub.lagging),
                evicted=hub.evicted,
            )
        return (HTTPStatus.SERVICE_UNAVAILABLE if degraded else HTTPStatus.OK), body

    def metrics_response(self, conn: ServerConnection, request: Request) -> Response:
        token = self.server.config.token
        if token is not None and not presented(request, token):
            return _unauthorized(
                conn,
                "Unauthorized: /metrics needs the server's token "
                "('Authorization: Bearer <token>' or ?token=)\n",
            )
        response = conn.respond(HTTPStatus.OK, "")
        response.body = metrics.render(self.metrics)
        _set_header(response, "Content-Type", metrics.CONTENT_TYPE)
        _set_header(response, "Content-Length", str(len(response.body)))
        return response

    def admit(self, conn: ServerConnection, request: Request) -> Response | None:
        """Credentials, then capacity: refused here, a client never reaches the handler."""
        server = self.server
        token = server.config.token
        if token is not None and not presented(request, token):
            # Neither the expected nor the presented token is ever logged.
            return _unauthorized(
                conn,
                "Unauthorized: present the server's token as 'Authorization: Bearer <token>' "
                "or as the 'token' query parameter\n",
            )
        if server.hub.clients >= server.capacity:
            self._log_full()
            return conn.respond(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"Service unavailable: {server.capacity} clients connected; try again later\n",
            )
        return None

    def _log_full(self) -> None:
        self._full_refused += 1
        now = time.monotonic()
        if now - self._full_logged_at >= FULL_LOG_INTERVAL:
            server = self.server
            log.warning(
                "server.full",
                clients=server.hub.clients,
                capacity=server.capacity,
                refused=self._full_refused,
                fd_bound=server.capacity < server.config.max_connections,
            )
            self._full_logged_at = now
            self._full_refused = 0


def _json(conn: ServerConnection, status: HTTPStatus, body: dict[str, object]) -> Response:
    response = conn.respond(status, json.dumps(body) + "\n")
    _set_header(response, "Content-Type", "application/json")
    return response


def _unauthorized(conn: ServerConnection, text: str) -> Response:
    response = conn.respond(HTTPStatus.UNAUTHORIZED, text)
    response.headers["WWW-Authenticate"] = 'Bearer realm="wstally"'
    return response


def _set_header(response: Response, name: str, value: str) -> None:
    # Headers.__setitem__ appends: remove the value websockets put there first.
    del response.headers[name]
    response.headers[name] = value


def _header_problem(request: Request) -> str | None:
    headers = request.headers
    for name in SINGLE_HEADERS:
        if len(headers.get_all(name)) > 1:
            return f"the {name} header is repeated; send it once"
    return None


def first_header(request: Request | None, name: str) -> str | None:
    """A header's value, or None; never raises, whatever the client sent."""
    if request is None:
        return None
    values = request.headers.get_all(name)
    return values[0] if values else None


def presented(request: Request, token: str) -> bool:
    """Whether the request carries the token (Bearer header, or ?token= for browsers)."""
    expected = token.encode()
    header = first_header(request, "Authorization") or ""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), expected):
        return True
    # Browsers cannot set headers on a WebSocket handshake: accept ?token= too.
    query = parse_qs(urlsplit(request.path).query)
    return any(hmac.compare_digest(v.encode(), expected) for v in query.get("token", []))


def select_subprotocol(
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
