"""What a session reports to its user interface: one small frozen dataclass per event."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Acked",
    "Event",
    "Item",
    "Paced",
    "Presence",
    "Refused",
    "Snapshot",
    "State",
    "Updates",
]


@dataclass(frozen=True, slots=True)
class Item:
    seq: int
    delta: int
    total: int
    by: str | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    epoch: str
    seq: int
    total: int
    clients: int
    # Set on a reconnect (or resync) in the same history: the seqs we never saw.
    missed: tuple[int, int] | None = None
    new_history: bool = False
    recovered: bool = False  # the server replayed every update we missed
    replayed: int = 0  # of which this many were missed (0: nothing happened while away)


@dataclass(frozen=True, slots=True)
class Updates:
    items: tuple[Item, ...]
    own: frozenset[int]  # seqs among the items that are this session's adds


@dataclass(frozen=True, slots=True)
class Acked:
    req_id: str
    delta: int
    seq: int
    total: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Refused:
    code: str
    message: str
    req_id: str | None
    delta: int | None  # None when nothing was given up: the add is resent (or had no id)


@dataclass(frozen=True, slots=True)
class Paced:
    """The server refused adds as too many per second: they are resent at this pace."""

    rate: float  # adds per second


@dataclass(frozen=True, slots=True)
class Presence:
    clients: int


@dataclass(frozen=True, slots=True)
class State:
    state: str  # "connecting", "connected", "reconnecting", "closed"
    retry_in: float | None = None
    error: str | None = None


Event = Snapshot | Updates | Acked | Refused | Paced | Presence | State
