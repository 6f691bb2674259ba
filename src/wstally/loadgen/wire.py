"""A deliberately minimal WebSocket client for load generation.

A load generator must cost far less per delivered update than the server it measures. The
full websockets client parses every frame into a message object and decodes it; here a
watcher reads the frame header and a few bytes of the payload (the updates frame starts with
its seq, and its first item's seq follows), which is enough to check continuity and count
deliveries. Only what wstally's server sends is handled: unfragmented text frames, ping and
close.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import struct
from collections.abc import Callable
from typing import cast

__all__ = [
    "PRESENCE_PREFIX",
    "UPDATES_PREFIX",
    "FrameClient",
    "HandshakeError",
    "encode_frame",
    "open_client",
]

# How wstally's compact JSON frames begin: enough to tell the hot ones apart unparsed.
UPDATES_PREFIX = b'{"type":"updates","seq":'
PRESENCE_PREFIX = b'{"type":"presence"'

OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


class HandshakeError(Exception):
    pass


def encode_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """A masked client frame. The mask is fixed at zero bytes: XOR with it is the identity,
    which RFC 6455 allows the server to accept (it cannot tell) and saves the XOR cost."""
    length = len(payload)
    head = bytes([0x80 | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    return head + b"\x00\x00\x00\x00" + payload


class FrameClient(asyncio.Protocol):
    """Parses server frames and hands each text payload to ``on_text``."""

    def __init__(
        self,
        on_text: Callable[[bytes], None],
        host: str,
        path: str = "/",
        token: str | None = None,
    ) -> None:
        self.on_text = on_text
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: wstally.v1\r\n{auth}\r\n"
        ).encode()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.bytes_in = 0
        self.close_code: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        buf = self.buffer
        buf += data
        if not self.upgraded.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            del buf[: end + 4]
            if b" 101 " not in status:
                self.upgraded.set_exception(HandshakeError(status.decode(errors="replace")))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded.set_result(None)
        self._parse()

    def _parse(self) -> None:
        buf = self.buffer
        pos = 0
        end = len(buf)
        on_text = self.on_text
        while end - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 10
            if end - pos < head + length:
                break
            start = pos + head
            payload = bytes(buf[start : start + length])
            pos = start + length
            opcode = b0 & 0x0F
            if opcode == OP_TEXT:
                on_text(payload)
            elif opcode == OP_PING:
                self.send(payload, OP_PONG)
            elif opcode == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.send(payload[:2], OP_CLOSE)
                assert self.transport is not None
                self.transport.close()
        if pos:
            del buf[:pos]

    def send(self, payload: bytes, opcode: int = OP_TEXT) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(payload, opcode))

    def send_many(self, payloads: list[bytes]) -> None:
        """Several text frames in one write."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(encode_frame(p) for p in payloads))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(struct.pack("!H", 1000), OP_CLOSE))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(exc or HandshakeError("connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)


async def open_client(
    host: str,
    port: int,
    on_text: Callable[[bytes], None],
    tls: ssl.SSLContext | None = None,
    token: str | None = None,
) -> FrameClient:
    """Connect and complete the opening handshake (the caller bounds the time)."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: FrameClient(on_text, f"{host}:{port}", token=token),
        host,
        port,
        ssl=tls,
        server_hostname=host if tls is not None else None,
    )
    await proto.upgraded
    return proto
