"""The published updates that some connection has still to be written, by seq.

Every connection that follows the broadcast keeps its own position (``Peer.sent``) and is
written what was published since, when its turn comes (hub.py). What lies between the
slowest one's position and the last published update is kept here, each update encoded
once as an item of an ``updates`` frame, and handed out by range. No I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from wstally import protocol
from wstally.tally import Update

__all__ = ["Backlog"]


class Backlog:
    """Updates with seqs ``base + 1`` to ``head``, consecutive, and their encoded items."""

    __slots__ = ("base", "items", "updates")

    def __init__(self, seq: int) -> None:
        self.base = seq
        self.updates: list[Update] = []
        self.items: list[str] = []

    def reset(self, seq: int) -> None:
        """Start over after ``seq`` (a new position): nothing is kept."""
        self.base = seq
        self.updates = []
        self.items = []

    @property
    def head(self) -> int:
        return self.base + len(self.updates)

    def extend(self, updates: Sequence[Update]) -> None:
        """Keep ``updates``, which continue ``head`` (the caller checks it)."""
        items = protocol.encode_items(updates)  # first: a failure leaves the backlog whole
        self.updates.extend(updates)
        self.items.extend(items)

    def between(self, after: int, through: int) -> tuple[list[Update], list[str]]:
        """The updates with seqs in (after, through], and their items."""
        start, end = after - self.base, through - self.base
        return self.updates[start:end], self.items[start:end]

    def trim(self, seq: int) -> None:
        """Forget the updates up to ``seq``: everyone has been written them."""
        drop = seq - self.base
        if drop > 0:
            del self.updates[:drop]
            del self.items[:drop]
            self.base = seq
