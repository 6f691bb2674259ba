"""Frame boundaries and the text of the common frame, against frames websockets itself
builds (its client side masks, as a browser or a terminal client would)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from wstally import wire

LIMIT = 8192


def client_bytes(frame: Frame) -> bytes:
    return frame.serialize(mask=True, extensions=[])


frames = st.builds(
    Frame,
    st.sampled_from([Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PING, Opcode.PONG]),
    st.binary(max_size=400),
    st.booleans(),
).filter(lambda f: f.fin or f.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT))
# Control frames carry at most 125 bytes.
frames = frames.filter(lambda f: f.opcode not in (Opcode.PING, Opcode.PONG) or len(f.data) < 126)


@given(st.lists(frames, min_size=1, max_size=8))
def test_every_boundary_is_found_and_every_prefix_needs_more(batch: list[Frame]) -> None:
    stream = b"".join(client_bytes(f) for f in batch)
    pos, ends = 0, []
    while pos < len(stream):
        end = wire.frame_end(stream, pos, LIMIT)
        assert end > pos
        for cut in [*range(pos, min(pos + 12, end)), end - 1]:
            assert wire.frame_end(stream[:cut], pos, LIMIT) == wire.NEED_MORE
        ends.append(end)
        pos = end
    assert len(ends) == len(batch)


@given(st.text(max_size=600))
def test_the_text_of_a_text_frame_is_read_back_exactly(text: str) -> None:
    data = client_bytes(Frame(Opcode.TEXT, text.encode()))
    prefix = client_bytes(Frame(Opcode.PING, b"p"))
    stream = prefix + data
    end = wire.frame_end(stream, len(prefix), LIMIT)
    if len(text.encode()) > LIMIT:
        assert end == wire.NOT_OURS
        return
    assert end == len(stream)
    assert stream[len(prefix)] == wire.TEXT
    assert wire.text_payload(stream, len(prefix), end) == text


def test_invalid_utf8_is_left_to_websockets() -> None:
    data = client_bytes(Frame(Opcode.TEXT, b"\xff\xfe ok"))
    assert wire.text_payload(data, 0, len(data)) is None


def test_what_only_websockets_should_judge() -> None:
    unmasked = Frame(Opcode.TEXT, b"add").serialize(mask=False, extensions=[])
    assert wire.frame_end(unmasked, 0, LIMIT) == wire.NOT_OURS
    huge = client_bytes(Frame(Opcode.TEXT, b"x" * 70_000))  # a 64-bit length
    assert wire.frame_end(huge[:10], 0, LIMIT) == wire.NOT_OURS  # from its header alone
    over = client_bytes(Frame(Opcode.TEXT, b"x" * (LIMIT + 1)))
    assert wire.frame_end(over[:4], 0, LIMIT) == wire.NOT_OURS


def test_fragments_are_followed_to_their_end() -> None:
    assert wire.unfinished(0x01, False)  # text, not FIN: a message begins
    assert wire.unfinished(0x00, True)  # continuation, not FIN: it goes on
    assert wire.unfinished(0x89, True)  # a ping between fragments changes nothing
    assert not wire.unfinished(0x80, True)  # continuation with FIN: it ends
    assert not wire.unfinished(0x81, False)
    assert wire.is_data(0x80)
    assert wire.is_data(0x82)
    assert not wire.is_data(0x89)
