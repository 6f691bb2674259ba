"""The broadcast's decisions, free of I/O: which frames go to whom, who lags, who is resumed
or evicted. The hub applies them to sockets through ``writer``; here everything is plain
values, so each rule is tested alone (tests/test_fanout.py).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from wstally import protocol
from wstally.tally import Update
from wstally.writer import framed

__all__ = [
    "NOTHING",
    "Broadcast",
    "Mode",
    "Phase",
    "Shared",
    "Verdict",
    "broadcast",
    "lag_verdict",
    "may_write",
    "resync_frame",
    "shared_frames",
]


class Mode(enum.Enum):
    PLAIN = "plain"
    JSON = "json"


class Phase(enum.Enum):
    """Where a connection stands with the broadcast (only the hub moves it)."""

    # A new JSON connection: its snapshot waits for its first message (a returning client's
    # hello asks for a replay, which must come before any live update), or a short timer.
    WAITING = "waiting"
    # A replay of missed updates is being sent: broadcasts are held (the replay covers them).
    REPLAYING = "replaying"
    LIVE = "live"


@dataclass(frozen=True, slots=True)
class Shared:
    """Frames that many connections get alike: their payloads, and the same frames framed
    for the wire once (``writer.framed``), which is what most connections are written."""

    frames: Sequence[bytes]
    wire: bytes

    @classmethod
    def of(cls, frames: Sequence[bytes]) -> Shared:
        return cls(frames, framed(frames))


NOTHING = Shared((), b"")


@dataclass(frozen=True, slots=True)
class Broadcast:
    """A range of updates' shared frames, encoded (and framed) once for every connection
    owed that range."""

    json: Shared  # updates frames (at most UPDATES_PER_FRAME items each)
    plain: Shared  # one "Server records total=N" per update
    presence: bytes | None  # the client count, when it changed
    # The presence frame, then the updates: for JSON peers that do not know the count yet.
    announced: Shared
    clients: int


def broadcast(
    updates: Sequence[Update],
    clients: int,
    presence_changed: bool,
    plain: bool = True,
    items: Sequence[str] | None = None,
) -> Broadcast:
    """The frames of a range of updates; ``plain``: whether any plain-mode connection needs
    its own; ``items``: the updates already encoded (``protocol.encode_items``)."""
    json_frames = [f.encode() for f in protocol.encode_updates_frames(updates, items)]
    json = Shared.of(json_frames) if json_frames else NOTHING
    plain_frames = NOTHING
    if plain and updates:
        plain_frames = Shared.of([t.encode() for t in protocol.plain_totals(updates)])
    presence = protocol.encode_presence(clients).encode() if presence_changed else None
    announced = NOTHING
    if presence is not None:
        announced = Shared((presence, *json.frames), framed((presence,)) + json.wire)
    return Broadcast(json, plain_frames, presence, announced, clients)


def shared_frames(
    mode: Mode, phase: Phase, clients_seen: int, frames: Broadcast
) -> tuple[Shared, int]:
    """The shared frames one connection gets, and the client count it then knows."""
    if mode is Mode.PLAIN:
        return frames.plain, clients_seen
    if phase is not Phase.LIVE:
        return NOTHING, clients_seen
    # Peers that already know the count (joins and leaves cancelled out, or their snapshot
    # said so) get the updates without the presence frame.
    if frames.presence is None or clients_seen == frames.clients:
        return frames.json, clients_seen
    return frames.announced, frames.clients


def may_write(buffered: int, limit: int, force: bool = False) -> bool:
    """Write now, or skip a connection whose write buffer is past the limit (it lags)."""
    return force or buffered <= limit


class Verdict(enum.Enum):
    RESUME = "resume"  # drained: write its own frames and a resync, read it again
    WAIT = "wait"  # still behind, within the slow-consumer timeout
    EVICT = "evict"  # behind for too long: close it with 4008


def lag_verdict(
    buffered: int, resume_below: int, lagging_for: float, slow_timeout: float
) -> Verdict:
    if buffered <= resume_below:
        return Verdict.RESUME
    return Verdict.EVICT if lagging_for > slow_timeout else Verdict.WAIT


def resync_frame(mode: Mode, phase: Phase, snapshot: str, total: int) -> bytes | None:
    """What a connection that drained gets: the current position, which sums up what it
    missed; nothing in the middle of a replay (broadcasts were held for it, not dropped)."""
    if phase is Phase.REPLAYING:
        return None
    if mode is Mode.JSON:
        return snapshot.encode()
    return protocol.encode_plain_total(total).encode()
