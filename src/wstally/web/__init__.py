"""The live page: ``GET /`` from a browser, and the few files it loads.

Everything is shipped inside the package and read once: no CDN, no network fetch, so the
page works offline. Every response carries a strict Content-Security-Policy: scripts and
styles only from this server's own files (no inline code), connections only back to it.
The page is static; it holds nothing about the server (the state arrives over the
WebSocket), so serving it needs no token even when the WebSocket does.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from importlib.resources import files

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

__all__ = ["ASSETS", "CSP", "policy", "respond"]

# path -> (file in this package, Content-Type)
ASSETS: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

# 'self' covers ws:/wss: to the same host in CSP Level 3 browsers (Chromium, Firefox,
# Safari 15.4+); the explicit ws/wss sources added per request cover older ones.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'{ws}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# A Host header that is a plain host[:port] (names, IPv4, bracketed IPv6) may be echoed
# into the policy; anything else gets the policy without the explicit ws sources.
_HOST = re.compile(r"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")

_cache: dict[str, str] = {}


def _text(name: str) -> str:
    # Read on first use, then kept: four small files.
    if name not in _cache:
        _cache[name] = files(__name__).joinpath(name).read_text(encoding="utf-8")
    return _cache[name]


def respond(conn: ServerConnection, request: Request) -> Response | None:
    """The page or one of its files for a plain GET of its path; None for any other path."""
    asset = ASSETS.get(request.path.partition("?")[0])
    if asset is None:
        return None
    name, content_type = asset
    response = conn.respond(HTTPStatus.OK, _text(name))
    headers = response.headers
    # Headers.__setitem__ appends: remove the text/plain type first.
    del headers["Content-Type"]
    headers["Content-Type"] = content_type
    hosts = request.headers.get_all("Host")
    headers["Content-Security-Policy"] = policy(hosts[0] if len(hosts) == 1 else None)
    headers["X-Content-Type-Options"] = "nosniff"
    # The page's URL may carry ?token=: never send it on as a Referer, never cache it.
    headers["Referrer-Policy"] = "no-referrer"
    headers["Cache-Control"] = "no-store"
    headers["X-Frame-Options"] = "DENY"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    headers["Cross-Origin-Resource-Policy"] = "same-origin"
    return response


def policy(host: str | None) -> str:
    """The Content-Security-Policy for a page requested with this Host header."""
    ws = f" ws://{host} wss://{host}" if host and _HOST.fullmatch(host) else ""
    return CSP.format(ws=ws)
