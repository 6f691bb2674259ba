"""The server's connection class over real sockets: reads parsed in turns, in order, with the
peer's EOF or reset arriving while slices still wait."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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
from wstally.connection import TallyConnection, connection_class

HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def client_frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    """One masked client frame."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    if n < 126:
        length = bytes([0x80 | n])
    elif n < 65536:
        length = bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        length = bytes([0x80 | 127]) + struct.pack("!Q", n)
    return bytes([(0x80 if fin else 0) | opcode]) + length + mask + masked


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


class Taker(Echo):
    """An echo server whose handler also takes messages straight off the wire (as wstally's
    handler takes adds), except those starting with "q": those it declines."""

    def __init__(self) -> None:
        super().__init__()
        self.taken: list[str] = []  # by the taker; got: by the handler's loop
        self.calls: list[int] = []  # how many texts each call of the taker was given

    def take(self, direct: object, texts: list[str]) -> int:
        assert direct is self
        assert texts, "called with no text"
        self.calls.append(len(texts))
        for i, text in enumerate(texts):
            if text.startswith("q"):
                return i
            self.taken.append(text)
        return len(texts)

    async def handler(self, ws: ServerConnection) -> None:
        assert isinstance(ws, TallyConnection)
        ws.intake.direct = self
        await super().handler(ws)


@contextlib.asynccontextmanager
async def echo_server(
    recorder: Echo | None = None, frame_limit: int = 0
) -> AsyncIterator[tuple[Echo, Server]]:
    recorder = recorder if recorder is not None else Echo()
    loop = asyncio.get_running_loop()

    def on_error(_loop: Any, context: dict[str, Any]) -> None:
        recorder.errors.append(f"{context.get('message')} {context.get('exception')!r}")

    loop.set_exception_handler(on_error)
    async with serve(
        recorder.handler,
        "127.0.0.1",
        0,
        create_connection=connection_class(
            frame_limit, None, recorder.take if isinstance(recorder, Taker) else None
        ),
        max_size=8192,  # as wstally's
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


def on_uvloop(
    scenario: Callable[[Echo, Server], Awaitable[None]],
    recorder: Echo | None = None,
    frame_limit: int = 0,
) -> None:
    """Run ``scenario`` against a fresh server on a uvloop loop of its own: uvloop (wstally
    serve's default) calls back in another order than asyncio, and the defects these tests
    keep out showed only there."""

    async def main() -> None:
        async with echo_server(recorder, frame_limit) as (got, server):
            await scenario(got, server)

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


# Reads split into frames: the common text frame to the taker, the rest to websockets.


async def read_frames(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """``count`` unmasked server frames off ``sock``: (first byte, payload)."""
    buffer = b""
    frames: list[tuple[int, bytes]] = []
    while len(frames) < count:
        chunk = await asyncio.wait_for(asyncio.to_thread(sock.recv, 65536), within(10))
        assert chunk, f"closed after {frames}"
        buffer += chunk
        while len(buffer) >= 2:
            n, start = buffer[1] & 0x7F, 2
            if n == 126:
                n, start = struct.unpack("!H", buffer[2:4])[0], 4
            if len(buffer) < start + n:
                break
            frames.append((buffer[0], buffer[start : start + n]))
            buffer = buffer[start + n :]
    return frames


async def until_taken(recorder: Taker, count: int) -> None:
    async with asyncio.timeout(within(10)):
        while len(recorder.taken) < count:  # noqa: ASYNC110 - polled server state
            await asyncio.sleep(0.01)


def server_connection(server: Server) -> TallyConnection:
    (ws,) = server.connections
    assert isinstance(ws, TallyConnection)
    return ws


def test_text_frames_go_to_the_taker_in_order_whatever_the_reads() -> None:
    async def scenario(recorder: Echo, server: Server) -> None:
        assert isinstance(recorder, Taker)
        sock = await open_raw(server)
        frames = [client_frame(b"m%04d" % i) for i in range(200)]
        frames[50:50] = [client_frame(b"ping-1", 0x9)]  # answered on the way
        frames[120:120] = [client_frame(b"x" * 300)]  # a 16-bit length, still the taker's
        stream = b"".join(frames)
        # One byte, then reads of every size cutting frames anywhere, then one big read.
        cuts = [0, 1, 2, 3, 7, 8, 20, 21, 64, 100, 101, 333, 1000, 1500, len(stream)]
        for start, stop in itertools.pairwise(cuts):
            sock.sendall(stream[start:stop])
            await asyncio.sleep(0.01)
        (pong,) = await read_frames(sock, 1)
        assert pong == (0x8A, b"ping-1")
        await until_taken(recorder, 201)
        expected = [f"m{i:04d}" for i in range(200)]
        expected.insert(119, "x" * 300)
        assert recorder.taken == expected
        assert recorder.got == []  # none went through websockets' queue
        assert server_connection(server).intake.split > 0
        sock.close()
        await asyncio.wait_for(recorder.closed.wait(), within(10))
        assert recorder.errors == []

    on_uvloop(scenario, Taker())


def test_a_declined_message_keeps_its_place_and_those_after_it_follow() -> None:
    async def scenario(recorder: Echo, server: Server) -> None:
        assert isinstance(recorder, Taker)
        sock = await open_raw(server)
        sock.sendall(b"".join(client_frame(m) for m in (b"d1", b"q2", b"d3", b"d4")))
        echoed = await read_frames(sock, 3)  # the handler echoes what it got
        assert [p for _, p in echoed] == [b"q2", b"d3", b"d4"]
        assert recorder.taken == ["d1"]
        sock.sendall(client_frame(b"d5"))  # the handler waits again: the taker's
        await until_taken(recorder, 2)
        assert recorder.taken == ["d1", "d5"]
        assert recorder.got == ["q2", "d3", "d4"]
        sock.close()
        await asyncio.wait_for(recorder.closed.wait(), within(10))

    on_uvloop(scenario, Taker())


def test_a_fragmented_message_is_websockets_to_assemble() -> None:
    async def scenario(recorder: Echo, server: Server) -> None:
        assert isinstance(recorder, Taker)
        sock = await open_raw(server)
        sock.sendall(
            client_frame(b"d1")
            + client_frame(b"fr", 0x1, fin=False)
            + client_frame(b"ping-2", 0x9)  # between fragments: legal
            + client_frame(b"ag", 0x0, fin=False)
            + client_frame(b"ment", 0x0)
            + client_frame(b"d2")
        )
        frames = await read_frames(sock, 3)
        assert frames == [(0x8A, b"ping-2"), (0x81, b"fragment"), (0x81, b"d2")]
        assert recorder.taken == ["d1"]
        assert recorder.got == ["fragment", "d2"]
        sock.close()
        await asyncio.wait_for(recorder.closed.wait(), within(10))

    on_uvloop(scenario, Taker())


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (client_frame(b"\xff\xfe"), 1007),  # invalid UTF-8
        (client_frame(b"q" * 9_000), 1009),  # over max_size
        (client_frame(b"q" * 70_000), 1009),  # over max_size, a 64-bit length
        (client_frame(b"q" * 2_000)[:1] + b"\x7e" + client_frame(b"q" * 2_000)[2:], 1002),
    ],
    ids=["invalid-utf8", "too-big", "too-big-64", "unmasked"],
)
def test_what_the_split_does_not_take_websockets_still_judges(frame: bytes, code: int) -> None:
    async def scenario(recorder: Echo, server: Server) -> None:
        assert isinstance(recorder, Taker)
        sock = await open_raw(server)
        sock.sendall(client_frame(b"d1"))
        await until_taken(recorder, 1)
        sock.sendall(frame + client_frame(b"d2"))
        ((first, payload),) = await read_frames(sock, 1)
        assert first == 0x88
        assert struct.unpack("!H", payload[:2])[0] == code
        assert recorder.taken == ["d1"]  # d2 came after the fault: never taken
        sock.close()
        await asyncio.wait_for(recorder.closed.wait(), within(10))

    on_uvloop(scenario, Taker())


def test_fragments_sent_with_the_handshake_are_followed_too() -> None:
    # websockets parses a first fragment that came with the handshake before the split
    # starts: a text frame inside that message must still close with 1002, not be taken.
    async def scenario(recorder: Echo, server: Server) -> None:
        assert isinstance(recorder, Taker)
        port = server.sockets[0].getsockname()[1]
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(HANDSHAKE + client_frame(b"fr", 0x1, fin=False))
        response = b""
        while b"\r\n\r\n" not in response:
            response += await asyncio.to_thread(sock.recv, 4096)
        await asyncio.sleep(0.05)
        sock.sendall(client_frame(b"d1"))
        ((first, payload),) = await read_frames(sock, 1)
        assert first == 0x88
        assert struct.unpack("!H", payload[:2])[0] == 1002
        assert recorder.taken == []
        sock.close()
        await asyncio.wait_for(recorder.closed.wait(), within(10))

    on_uvloop(scenario, Taker())


def test_a_declined_frame_counts_once_against_the_frame_budget() -> None:
    async def scenario(recorder: Echo, server: Server) -> None:
        sock = await open_raw(server)
        for i in range(9):  # under a budget of 10 a second, one read each
            sock.sendall(client_frame(b"q%d" % i))  # declined: websockets' queue counts it
            ((first, payload),) = await read_frames(sock, 1)
            assert (first, payload) == (0x81, b"q%d" % i)  # echoed, not closed
        sock.sendall(client_frame(b"q9") + client_frame(b"q10"))  # the 11th: over
        ((first, payload),) = await read_frames(sock, 1)  # before q9's echo
        assert first == 0x88
        assert struct.unpack("!H", payload[:2])[0] == 1008
        sock.close()
        await asyncio.wait_for(recorder.closed.wait(), within(10))

    on_uvloop(scenario, Taker(), frame_limit=10)


def test_a_run_of_adds_over_the_frame_budget_is_cut_where_it_crosses_it() -> None:
    async def scenario(recorder: Echo, server: Server) -> None:
        assert isinstance(recorder, Taker)
        sock = await open_raw(server)
        sock.sendall(client_frame(b"d0"))
        await until_taken(recorder, 1)  # the handler waits: the frames are the taker's
        sock.sendall(b"".join(client_frame(b"d%d" % i) for i in range(1, 24)))  # one read
        ((first, payload),) = await read_frames(sock, 1)
        assert first == 0x88
        assert struct.unpack("!H", payload[:2])[0] == 1008
        # Within the budget, in order, and not one more: the first 10, or the first 20 if a
        # loaded machine took over a second from the connection's start to the 11th frame
        # (the budget's second then starts over at it).
        assert recorder.taken in ([f"d{i}" for i in range(10)], [f"d{i}" for i in range(20)])
        assert recorder.got == []
        sock.close()
        await asyncio.wait_for(recorder.closed.wait(), within(10))

    on_uvloop(scenario, Taker(), frame_limit=10)


def test_the_taker_gets_each_run_of_text_frames_in_one_call() -> None:
    async def scenario(recorder: Echo, server: Server) -> None:
        assert isinstance(recorder, Taker)
        sock = await open_raw(server)
        sock.sendall(client_frame(b"d0"))
        await until_taken(recorder, 1)  # the connection is split from now on
        runs = [b"".join(client_frame(b"d%d" % i) for i in range(k, k + 5)) for k in (1, 6)]
        sock.sendall(runs[0] + client_frame(b"ping", 0x9) + runs[1])
        assert await read_frames(sock, 1) == [(0x8A, b"ping")]
        await until_taken(recorder, 11)
        assert recorder.taken == [f"d{i}" for i in range(11)]
        # One read (a hundred bytes on loopback): a call per run, the ping between them.
        assert recorder.calls == [1, 5, 5]
        sock.close()
        await asyncio.wait_for(recorder.closed.wait(), within(10))

    on_uvloop(scenario, Taker())
