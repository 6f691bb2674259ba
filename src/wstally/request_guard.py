"""A look at the whole request head before websockets parses it: a request that websockets
would drop without a word (a POST, bare LF line ends) gets a 4xx answer, and an address
that flooded gets a 429 with Retry-After."""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from http import HTTPStatus
from math import ceil

from websockets.exceptions import InvalidMessage
from websockets.server import ServerProtocol

__all__ = ["MAX_HEAD", "guarded_parse", "request_problem"]

# Past this many bytes without the end of the request head, websockets' own parser takes
# over (and answers 414 or 431 itself).
MAX_HEAD = 16 * 1024


def request_problem(buffer: bytes) -> tuple[HTTPStatus, str] | None:
    """What is wrong with a request head that websockets would drop without a word."""
    end = buffer.find(b"\r\n\r\n")
    bare = buffer.find(b"\n\n")
    if bare != -1 and (end == -1 or bare < end):
        return HTTPStatus.BAD_REQUEST, "Bad request: end every line with CRLF (\\r\\n)\n"
    head = buffer if end == -1 else buffer[: end + 2]
    if b"\n" in head.replace(b"\r\n", b""):
        return HTTPStatus.BAD_REQUEST, "Bad request: end every line with CRLF (\\r\\n)\n"
    method = head.split(b" ", 1)[0]
    if method != b"GET" and method.isalpha() and method.isupper():
        return (
            HTTPStatus.METHOD_NOT_ALLOWED,
            "Method not allowed: use GET (the WebSocket handshake, /healthz, the page)\n",
        )
    return None


def guarded_parse(protocol: ServerProtocol, banned: float = 0.0) -> Generator[None]:
    """websockets' request parser, after a look at the whole head: a request it would drop
    silently (a POST, bare LF line ends) gets a 4xx answer instead, and an address that
    flooded (``banned`` seconds to go, penalty.py) a 429 with Retry-After."""
    reader = protocol.reader
    while (
        b"\n\n" not in reader.buffer
        and b"\r\n\r\n" not in reader.buffer
        and not reader.eof
        and len(reader.buffer) <= MAX_HEAD
    ):
        yield
    if banned:
        text = f"Too many requests: this address flooded; try again in {ceil(banned)} s\n"
        protocol.handshake_exc = InvalidMessage(f"refused: {text}")
        response = protocol.reject(HTTPStatus.TOO_MANY_REQUESTS, text)
        response.headers["Retry-After"] = str(ceil(banned))
        protocol.send_response(response)
        yield
        return
    problem = request_problem(bytes(reader.buffer[:MAX_HEAD]))
    if problem is None:
        end = reader.buffer.find(b"\r\n\r\n") + 4
        if 4 <= end < len(reader.buffer) and b"\nupgrade:" not in reader.buffer[:end].lower():
            # A pipelined request after a plain HTTP one: websockets would parse it as a
            # WebSocket frame and drop the connection unanswered. The first request is
            # answered (and the connection closed, HTTP/1.1 with Connection: close).
            del reader.buffer[end:]
        # websockets' own parser takes over from here, for the connection's lifetime: this
        # guard steps out rather than wrap every frame that follows.
        parser = protocol.parse()
        protocol.parser = parser
        with contextlib.suppress(StopIteration):
            next(parser)
        yield
        return
    status, text = problem
    protocol.handshake_exc = InvalidMessage(f"did not receive a valid HTTP request: {text}")
    protocol.send_response(protocol.reject(status, text))
    yield
