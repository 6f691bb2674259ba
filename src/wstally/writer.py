"""The hub's thin writer: frames as text and handed to the socket in one write.

websockets' own ``send()`` costs a write (a syscall) per message; the hub hands a tick's
frames for one connection to the transport at once. This is websockets' ``send_data()``
with the frames joined, and its guard: never between the fragments of a message that
``send()`` is still streaming.
"""

from __future__ import annotations

from collections.abc import Iterable

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

__all__ = ["write_frames"]

OPEN = State.OPEN


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
