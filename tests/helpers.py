"""Test helpers: a JSON-mode client that records frames, raw HTTP, a controllable store."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from wstally.protocol import SUBPROTOCOL
from wstally.server import TallyServer
from wstally.store import MemoryStore, Store
from wstally.tally import Update

# Every timeout in the suite is a multiple of this, so a slow CI machine can stretch them all.
UNIT = float(os.environ.get("WSTALLY_TEST_UNIT", "1.0"))


def within(units: float = 1.0) -> float:
    return units * UNIT


ServerFactory = Callable[..., Awaitable[TallyServer]]


class JsonClient:
    """A JSON-mode test client that keeps every frame it receives, by type."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.snapshot: dict[str, Any] = {}
        self.frames: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, url: str, hello: dict[str, Any] | None = None) -> JsonClient:
        ws = await connect(url, subprotocols=[SUBPROTOCOL], open_timeout=within(5))
        client = cls(ws)
        # Hello first, as real clients do: the server holds the snapshot until it sees it.
        if hello is not None:
            await client.send({"type": "hello", **hello})
        client.snapshot = await client.expect("snapshot")
        return client

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = within(5)) -> dict[str, Any]:
        frame = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        assert isinstance(frame, dict)
        self.frames.append(frame)
        return frame

    async def expect(self, kind: str, timeout: float = within(5)) -> dict[str, Any]:
        """The next frame of type ``kind``, skipping (but recording) broadcast frames."""
        while True:
            frame = await self.recv(timeout)
            if frame["type"] == kind:
                return frame
            if frame["type"] not in ("presence", "updates"):
                raise AssertionError(f"expected {kind}, got {frame}")

    async def add(self, delta: int, req_id: str | None = None) -> dict[str, Any]:
        """Send an add and return the ack (or error) for it."""
        message: dict[str, Any] = {"type": "add", "delta": delta}
        if req_id is not None:
            message["id"] = req_id
        await self.send(message)
        while True:
            frame = await self.recv()
            if frame["type"] in ("ack", "error"):
                return frame

    async def items_until(self, seq: int, timeout: float = within(10)) -> list[dict[str, Any]]:
        """Every update item received (including earlier ones) once ``seq`` has been seen."""
        async with asyncio.timeout(timeout):
            while not self.frames or self.last_seq() < seq:
                await self.recv(timeout)
        return self.items()

    def items(self) -> list[dict[str, Any]]:
        return [item for f in self.frames if f["type"] == "updates" for item in f["items"]]

    def last_seq(self) -> int:
        seqs = [f["seq"] for f in self.frames if f["type"] in ("updates", "snapshot")]
        return seqs[-1] if seqs else int(self.snapshot["seq"])

    async def close(self) -> None:
        await self.ws.close()


OpenClient = Callable[..., Awaitable[JsonClient]]  # the open_client fixture


async def http_get(port: int, path: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    """A minimal HTTP/1.1 GET, with extra header lines, to see exactly what the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = "".join(f"{line}\r\n" for line in headers)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), within(5))
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, fields, body


class GatedStore:
    """A real store whose commits can be held back or made to fail, to observe ordering."""

    blocking = True
    description = "gated"

    def __init__(self, inner: Store | None = None) -> None:
        self.inner = inner if inner is not None else MemoryStore()
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False
        self.commits: list[int] = []

    def load(self, window: int) -> Any:
        return self.inner.load(window)

    def commit(self, batch: Sequence[Update]) -> None:
        if not self.gate.wait(timeout=within(10)):
            raise TimeoutError("gate never opened")
        if self.fail:
            raise OSError(28, "No space left on device")
        self.inner.commit(batch)
        self.commits.append(len(batch))

    def history(self, since: int = 0, limit: int | None = None) -> list[Update]:
        return self.inner.history(since, limit)

    def check(self) -> None:
        self.inner.check()

    def close(self) -> None:
        self.gate.set()
        self.inner.close()
