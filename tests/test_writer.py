"""The hub's writer over a real connection: what it writes is what a client reads."""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from helpers import within
from wstally.writer import framed, write_frames, write_shared


async def test_frames_leave_in_one_write_and_arrive_in_order() -> None:
    connected: asyncio.Future[ServerConnection] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        connected.set_result(ws)
        await done.wait()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/") as client:
            ws = await asyncio.wait_for(connected, within(5))
            writes: list[bytes] = []
            real_write = ws.transport.write

            def counting(data: bytes | bytearray | memoryview) -> None:
                writes.append(bytes(data))
                real_write(data)

            ws.transport.write = counting  # type: ignore[method-assign]
            written = write_frames(ws, [b"one", b"two", "\u00e9".encode()])
            assert written == sum(len(w) for w in writes)
            assert len(writes) == 1  # one syscall for the three frames
            got = [await asyncio.wait_for(client.recv(), within(5)) for _ in range(3)]
            assert got == ["one", "two", "\u00e9"]
            assert write_frames(ws, []) == 0
            await client.close()
            await ws.wait_closed()
            assert write_frames(ws, [b"late"]) is None  # not open: nothing written
            done.set()


async def test_shared_wire_follows_own_frames_with_and_without_compression() -> None:
    # Without an extension the pre-framed bytes are written as they are; with
    # permessage-deflate they would be garbage to the client, so they are framed again.
    for compression in (None, "deflate"):
        connected: asyncio.Future[ServerConnection] = asyncio.get_running_loop().create_future()
        done = asyncio.Event()

        async def handler(ws: ServerConnection) -> None:
            connected.set_result(ws)  # noqa: B023 - awaited before the next iteration
            await done.wait()  # noqa: B023

        async with serve(handler, "127.0.0.1", 0, compression=compression) as server:
            port = server.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}/"
            async with connect(url, compression=compression) as client:
                ws = await asyncio.wait_for(connected, within(5))
                assert bool(ws.protocol.extensions) is (compression is not None)
                shared = [b"shared one", b"shared two"]
                written = write_shared(ws, [b"own"], shared, framed(shared))
                assert written is not None
                assert written > 0
                got = [await asyncio.wait_for(client.recv(), within(5)) for _ in range(3)]
                assert got == ["own", "shared one", "shared two"]
                assert write_shared(ws, [], [], b"") == 0
                await client.close()
                await ws.wait_closed()
                assert write_shared(ws, [], shared, framed(shared)) is None
                done.set()
