"""The server's connection class over real sockets: reads parsed in turns, in order, with the
peer's EOF or reset arriving while slices still wait."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from websockets.asyncio.server import Server, ServerConnection, serve

from helpers import within
from wstally import connection
from wstally.connection import connection_class

HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked client frame."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
    return bytes([0x80 | opcode]) + length + mask + masked


class Echo:
    """A server that echoes and records every message its handler takes, and the loop's
    errors."""

    def __init__(self) -> None:
        self.got: list[str | bytes] = []
        self.errors: list[str] = []
        self.closed = asyncio.Event()

    async def handler(self, ws: ServerConnection) -> None:
        try:
            async for message in ws:
                self.got.append(message)
                await ws.send(message)  # writes: how a reset peer is noticed
        finally:
            self.closed.set()


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[Echo, Server]]:
    recorder = Echo()
    loop = asyncio.get_running_loop()

    def on_error(_loop: Any, context: dict[str, Any]) -> None:
        recorder.errors.append(f"{context.get('message')} {context.get('exception')!r}")

    loop.set_exception_handler(on_error)
    async with serve(
        recorder.handler, "127.0.0.1", 0, create_connection=connection_class(0, None)
    ) as server:
        yield recorder, server


@pytest.fixture(autouse=True)
def one_slice_a_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every read of more than a slice is parsed one slice a loop turn: the waiting slices
    # are what the peer's EOF and reset must not overtake.
    monkeypatch.setattr(connection, "TURN", 0.0)


async def open_raw(server: Server) -> socket.socket:
    port = server.sockets[0].getsockname()[1]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(HANDSHAKE)
    response = b""
    while b"\r\n\r\n" not in response:
        response += await asyncio.to_thread(sock.recv, 4096)
    assert response.startswith(b"HTTP/1.1 101")
    return sock


def on_uvloop(scenario: Callable[[Echo, Server], Awaitable[None]]) -> None:
    """Run ``scenario`` against a fresh server on a uvloop loop of its own: uvloop (wstally
    serve's default) calls back in another order than asyncio, and the defects these tests
    keep out showed only there."""

    async def main() -> None:
        async with echo_server() as (recorder, server):
            await scenario(recorder, server)

    uvloop.run(main())


@pytest.mark.parametrize("close_frame", [True, False])
def test_frames_ahead_of_the_eof_are_all_taken(close_frame: bool) -> None:
    async def scenario(recorder: Echo, server: Server) -> None:
        sock = await open_raw(server)
        burst = b"".join(client_frame(b"m%06d" % i) for i in range(300))
        burst += b"".join(client_frame(b"B" * 3000) for _ in range(5))
        if close_frame:
            burst += client_frame(struct.pack("!H", 1000), 0x8)
        sock.sendall(burst)
        sock.shutdown(socket.SHUT_WR)  # the EOF arrives while most of the burst waits
        await asyncio.wait_for(recorder.closed.wait(), within(10))
        sock.close()
        assert recorder.got[:300] == [f"m{i:06d}" for i in range(300)]
        assert recorder.got[300:] == ["B" * 3000] * 5
        assert recorder.errors == []

    on_uvloop(scenario)


def test_a_reset_while_slices_wait_raises_nothing() -> None:
    async def scenario(recorder: Echo, server: Server) -> None:
        sock = await open_raw(server)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # echoes back up soon
        sock.sendall(b"".join(client_frame(b"m%06d" % i) for i in range(15000)))
        await asyncio.sleep(0.01)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST: the connection is lost with read bytes still unparsed
        await asyncio.wait_for(recorder.closed.wait(), within(10))
        await asyncio.sleep(0.05)  # the turns that were already scheduled
        got = recorder.got
        assert got == [f"m{i:06d}" for i in range(len(got))]  # in order, whatever was taken
        assert recorder.errors == []

    on_uvloop(scenario)
