"""The hub's writer over a real connection: what it writes is what a client reads."""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from helpers import within
from wstally.writer import write_frames


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
