"""Addresses that flooded: refused new connections for a while, longer each time.

A frame budget closes a flooding connection within a fraction of a second, but each new
session costs a handshake and a budget's worth of frames before it is closed: a flooder that
reconnects at once kept the loop busy and others' acks 45x slower. After a flood close, its
address waits before it may connect again (429 with Retry-After), --flood-ban (1 s) the first
time and twice as long at each repeat, up to a minute (or the first ban, if longer);
connections already open are not touched.

Pure bookkeeping: the caller passes the clock. Bounded: past MAX_ADDRESSES the oldest entry
is forgotten (a spoofing attacker gains nothing by churning addresses; TCP needs a real one).
"""

from __future__ import annotations

__all__ = ["FORGET_AFTER", "MAX_ADDRESSES", "MAX_BAN", "Penalties"]

MAX_BAN = 60.0
# An address that has not flooded for this long starts again from the first ban.
FORGET_AFTER = 600.0
MAX_ADDRESSES = 65_536


class Penalties:
    """Per address: how many floods in a row, and until when new connections are refused."""

    def __init__(self, first: float) -> None:
        self.first = first  # the first ban, in seconds
        # address -> (strikes, banned until); insertion order is last-strike order.
        self._entries: dict[str, tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def strike(self, address: str, now: float) -> float:
        """Record a flood from ``address``; returns how long it is now refused (seconds)."""
        strikes, until = self._entries.pop(address, (0, now))
        if now - until > FORGET_AFTER:
            strikes = 0
        ban = min(self.first * float(2 ** min(strikes, 16)), max(MAX_BAN, self.first))
        self._entries[address] = (strikes + 1, now + ban)
        if len(self._entries) > MAX_ADDRESSES:
            del self._entries[next(iter(self._entries))]
        return ban

    def refused_for(self, address: str, now: float) -> float:
        """Seconds until ``address`` may connect again; 0.0 when it may now."""
        entry = self._entries.get(address)
        if entry is None:
            return 0.0
        return max(0.0, entry[1] - now)
