"""Frame boundaries in what a client sent, and the text of the one frame shape that carries
nearly all traffic: a small, masked, unfragmented text frame (an add).

websockets parses every frame with a generator, queues every message for the handler's
task and wakes that task once per message: about a third of the server's CPU per add. The
connection (connection.py) hands that common frame's text straight to the handler and every
other frame, whole, to websockets' parser, which stays in charge of everything else (pings,
close, fragments, binary, invalid UTF-8, oversized frames). Pure functions, no I/O.
"""

from __future__ import annotations

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask

__all__ = ["NEED_MORE", "NOT_OURS", "TEXT", "frame_end", "is_data", "text_payload", "unfinished"]

# The first byte of an unfragmented text frame: FIN, no RSV bits, opcode 1.
TEXT = 0x81
# frame_end's answers other than an end index.
NEED_MORE = 0
NOT_OURS = -1


def frame_end(data: bytes, pos: int, limit: int) -> int:
    """Where the frame starting at ``pos`` ends; NEED_MORE if ``data`` stops first.

    NOT_OURS for a frame only websockets should judge from its first bytes on: unmasked
    (a protocol error from a client), a 64-bit length, or a payload over ``limit`` (it
    closes with 1009 as soon as it reads the length, without waiting for the payload).
    """
    n = len(data)
    if n - pos < 2:
        return NEED_MORE
    second = data[pos + 1]
    if not second & 0x80:
        return NOT_OURS
    length = second & 0x7F
    if length < 126:
        start = pos + 6  # two bytes of header, four of mask
    elif length == 126:
        if n - pos < 4:
            return NEED_MORE
        length = (data[pos + 2] << 8) | data[pos + 3]
        start = pos + 8
    else:
        return NOT_OURS
    if length > limit:
        return NOT_OURS
    end = start + length
    return end if end <= n else NEED_MORE


def text_payload(data: bytes, pos: int, end: int) -> str | None:
    """The text of the whole frame ``data[pos:end]``, unmasked; None if not valid UTF-8
    (websockets then closes the connection with 1007, as for any other frame)."""
    start = pos + 6 if data[pos + 1] & 0x7F < 126 else pos + 8
    try:
        return apply_mask(data[start:end], data[start - 4 : start]).decode()
    except UnicodeDecodeError:
        return None


def is_data(first: int) -> bool:
    """A text, binary or continuation frame (a message's part), by its first byte."""
    return first & 0x0F < 0x8


def unfinished(first: int, fragmented: bool) -> bool:
    """Whether a message is still in fragments after a data frame with this first byte."""
    opcode = first & 0x0F
    if opcode in (0x1, 0x2):
        return not first & 0x80
    if opcode == 0x0:
        return fragmented and not first & 0x80
    return fragmented
