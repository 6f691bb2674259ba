"""Why a connection attempt failed, in words for the user: HTTP refusals of the handshake
named for what they are, and connection errors."""

from __future__ import annotations

from websockets.exceptions import ConnectionClosed, InvalidStatus

from wstally.text import escape_text

__all__ = ["REFUSALS", "describe", "handshake_refusal"]

REFUSALS = {
    401: "the server wants a token (pass --token or set WSTALLY_TOKEN)",
    403: "the server forbids this client",
    404: "no WebSocket endpoint at this URL",
}


def handshake_refusal(exc: InvalidStatus, token: bool) -> tuple[str, bool]:
    """What an HTTP answer to the handshake means, and whether it is final."""
    status = exc.response.status_code
    body = escape_text(exc.response.body.decode(errors="replace").strip(), 200)
    detail = f": {body}" if body else ""
    if status == 401 and token:
        return f"the server did not accept the token (HTTP 401{detail})", True
    if status == 503:
        return f"the server is full (HTTP 503{detail})", False
    if status in REFUSALS:
        return f"{REFUSALS[status]} (HTTP {status}{detail})", True
    if 400 <= status < 500:
        return f"the server refused the handshake (HTTP {status}{detail})", True
    return f"the server could not take the connection (HTTP {status}{detail})", False


def describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        rcvd = exc.rcvd
        return (
            f"connection closed ({rcvd.code} {rcvd.reason})".strip() if rcvd else "connection lost"
        )
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return str(exc) or type(exc).__name__
