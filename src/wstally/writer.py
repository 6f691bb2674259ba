"""The hub's thin writer: frames as text and handed to the socket in one write.

websockets' own ``send()`` costs a write (a syscall) per message; the hub hands a tick's
frames for one connection to the transport at once. This is websockets' ``send_data()``
with the frames joined, and its guard: never between the fragments of a message that
``send()`` is still streaming.

The broadcast is framed once per range of updates (``framed``), not once per connection: a server's
frames are not masked, so without an extension (compression) every connection gets the
same bytes. Framing a frame through websockets' protocol object costs about 2 us; at a
thousand connections that was a fifth of a flush.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from websockets.asyncio.server import ServerConnection
from websockets.frames import Opcode
from websockets.protocol import State

__all__ = ["framed", "text_frame", "write_frames", "write_shared"]

OPEN = State.OPEN
FIN_TEXT = 0x80 | Opcode.TEXT.value  # the first byte of a final text frame


def framed(payloads: Iterable[bytes]) -> bytes:
    """``payloads`` as text frames, as a server writes them to a connection without
    extensions (unmasked, uncompressed): the same bytes for every such connection."""
    return b"".join(map(text_frame, payloads))


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame (RFC 6455, 5.2): what websockets' ``Frame.serialize``
    makes of it without extensions (a test holds them equal), at a third of the cost of
    websockets' ``send_text``: an ack is framed per add."""
    size = len(payload)
    if size < 126:
        return bytes((FIN_TEXT, size)) + payload
    if size < 65536:
        return bytes((FIN_TEXT, 126)) + size.to_bytes(2, "big") + payload
    return bytes((FIN_TEXT, 127)) + size.to_bytes(8, "big") + payload


def write_frames(ws: ServerConnection, frames: Iterable[bytes]) -> int | None:
    """Write ``frames``; the bytes written, or None when the connection cannot take them now
    (not open, or a fragmented message in progress): the caller keeps what is its own."""
    protocol = ws.protocol
    if protocol.state is not OPEN or ws.send_in_progress is not None:
        return None
    send_text = protocol.send_text
    for frame in frames:
        send_text(frame)
    data = protocol.data_to_send()
    if not data:
        return 0
    transport = ws.transport
    # One write (one syscall) for every frame of this tick.
    chunk = data[0] if len(data) == 1 else b"".join(data)
    transport.write(chunk)
    if not data[-1]:
        # An end-of-stream marker, as websockets' own send_data() honours it.
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()
    return len(chunk)


def write_shared(
    ws: ServerConnection, own: Sequence[bytes], frames: Sequence[bytes], wire: bytes
) -> int | None:
    """Write ``own`` then the shared ``frames``, which ``wire`` holds already framed (see
    ``framed``); as ``write_frames`` otherwise, and the bytes written."""
    protocol = ws.protocol
    if protocol.extensions or protocol.debug:
        # Compressed per connection, or logged frame by frame: framed here, as before.
        return write_frames(ws, (*own, *frames))
    if protocol.state is not OPEN or ws.send_in_progress is not None:
        return None
    # Whatever the protocol queued (a pong, say) goes first, in one write. No end-of-stream
    # marker can be among it: only closing queues one, and we are open.
    data = protocol.data_to_send()
    if own:
        chunk = b"".join((*data, *map(text_frame, own), wire))
    else:
        chunk = b"".join((*data, wire)) if data else wire
    if chunk:
        ws.transport.write(chunk)
    return len(chunk)
