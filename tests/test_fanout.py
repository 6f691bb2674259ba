"""The broadcast's decisions, tested alone: plain values in, plain values out."""

from __future__ import annotations

import json

from websockets.protocol import State
from websockets.server import ServerProtocol

from wstally import fanout, protocol, writer
from wstally.fanout import Mode, Phase, Verdict
from wstally.tally import Update


def updates(first: int, count: int) -> list[Update]:
    return [Update(n, 1, n, 0.0, "c", name="ann") for n in range(first, first + count)]


def test_a_backlog_is_several_bounded_frames_in_order() -> None:
    count = 2 * protocol.UPDATES_PER_FRAME + 3
    frames = fanout.broadcast(updates(1, count), clients=3, presence_changed=False)
    decoded = [json.loads(f) for f in frames.json.frames]
    assert len(decoded) == 3
    assert [i["seq"] for f in decoded for i in f["items"]] == list(range(1, count + 1))
    assert [f["seq"] for f in decoded] == [256, 512, count]
    assert all(len(f) <= protocol.MAX_SERVER_FRAME for f in frames.json.frames)
    assert frames.plain.frames[0] == b"Server records total=1"
    assert frames.presence is None


def test_presence_only_to_those_who_do_not_know_the_count() -> None:
    frames = fanout.broadcast(updates(1, 1), clients=5, presence_changed=True)
    shared, seen = fanout.shared_frames(Mode.JSON, Phase.LIVE, 4, frames)
    assert (shared.frames[0], seen) == (b'{"type":"presence","clients":5}', 5)
    assert list(shared.frames[1:]) == list(frames.json.frames)
    assert shared.wire == writer.framed(shared.frames)
    shared, seen = fanout.shared_frames(Mode.JSON, Phase.LIVE, 5, frames)
    assert (shared, seen) == (frames.json, 5)


def test_held_phases_get_no_broadcast_and_plain_gets_totals() -> None:
    frames = fanout.broadcast(updates(1, 2), clients=2, presence_changed=True)
    for phase in (Phase.WAITING, Phase.REPLAYING):
        assert fanout.shared_frames(Mode.JSON, phase, 1, frames) == (fanout.NOTHING, 1)
    shared, _ = fanout.shared_frames(Mode.PLAIN, Phase.LIVE, 0, frames)
    assert list(shared.frames) == [b"Server records total=1", b"Server records total=2"]


def test_plain_totals_are_built_only_for_plain_peers() -> None:
    frames = fanout.broadcast(updates(1, 2), clients=2, presence_changed=False, plain=False)
    assert frames.plain == fanout.NOTHING
    assert frames.json.frames


def test_shared_frames_are_framed_once_as_websockets_frames_them() -> None:
    frames = fanout.broadcast(updates(1, 3), clients=2, presence_changed=True)
    protocol_ = ServerProtocol()
    protocol_.state = State.OPEN
    for shared in (frames.json, frames.plain, frames.announced):
        for payload in shared.frames:
            protocol_.send_text(payload)
        assert shared.wire == b"".join(protocol_.data_to_send())
    # Every length encoding: 7 bits, 16 bits, 64 bits, at their edges.
    for size in (0, 1, 125, 126, 127, 65535, 65536, 70000):
        payload = b"x" * size
        protocol_.send_text(payload)
        assert writer.text_frame(payload) == b"".join(protocol_.data_to_send())


def test_a_full_buffer_is_skipped_unless_forced() -> None:
    assert fanout.may_write(100, 100)
    assert not fanout.may_write(101, 100)
    assert fanout.may_write(10**9, 100, force=True)


def test_lag_verdicts() -> None:
    assert fanout.lag_verdict(10, 64, 9.0, 5.0) is Verdict.RESUME  # drained wins
    assert fanout.lag_verdict(100, 64, 1.0, 5.0) is Verdict.WAIT
    assert fanout.lag_verdict(100, 64, 5.1, 5.0) is Verdict.EVICT


def test_resync_is_the_current_position_except_mid_replay() -> None:
    snap = protocol.encode_snapshot("e", 7, 70, 2)
    assert fanout.resync_frame(Mode.JSON, Phase.LIVE, snap, 70) == snap.encode()
    assert fanout.resync_frame(Mode.PLAIN, Phase.LIVE, snap, 70) == b"Server records total=70"
    assert fanout.resync_frame(Mode.JSON, Phase.REPLAYING, snap, 70) is None
