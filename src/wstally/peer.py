"""One connection as the hub and the handler see it: who it is, what it is owed, and its
figures for the ``conn.closed`` line."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection

from wstally.budgets import TokenBucket, Window
from wstally.fanout import Mode, Phase

__all__ = ["Lag", "Peer"]


@dataclass(slots=True)
class Lag:
    """One episode of a connection falling behind (made only when it happens)."""

    since: float  # loop time it fell behind
    seq: int  # the seq it had been written through then
    # The handler waits on it before reading more, so that a client that does not read
    # cannot make us queue unbounded acks for it.
    drained: asyncio.Event = field(default_factory=asyncio.Event)


class Peer:
    """One registered connection, as the hub sees it."""

    __slots__ = (
        "addr",
        "adds",
        "applied",
        "bytes_in",
        "bytes_out",
        "client",
        "clients_seen",
        "delta_sum",
        "duplicates",
        "frames_out",
        "greeted",
        "hold",
        "id",
        "invalid",
        "lag",
        "lagged",
        "messages_in",
        "mode",
        "name",
        "outbox",
        "phase",
        "refused",
        "sent",
        "ws",
    )

    def __init__(self, ws: ServerConnection, mode: Mode, conn_id: str) -> None:
        self.ws = ws
        self.mode = mode
        self.id = conn_id
        addr = ws.remote_address
        self.addr: str | None = f"{addr[0]}:{addr[1]}" if addr else None
        self.client: str | None = None
        self.name: str | None = None
        self.greeted = False  # a hello or an add was seen: no hello from now on
        # Budgets (budgets.py), made on first use: the add rate limit, malformed frames.
        self.adds: TokenBucket | None = None
        self.invalid: Window | None = None
        # Where it stands with the broadcast (fanout.Phase); moved by the hub only. The
        # timer ends a WAITING phase that no first message ends.
        self.phase = Phase.LIVE
        self.hold: asyncio.TimerHandle | None = None
        # Frames for this connection alone, written at the next flush.
        self.outbox: list[bytes] = []
        # The seq through which the broadcast has been written to it (set by the hub when
        # it registers, goes live or is resynced): what it is owed is what follows.
        self.sent = 0
        # The client count this peer last heard of, in a snapshot or a presence frame.
        self.clients_seen = 0
        self.lag: Lag | None = None  # while it lags: one per episode
        self.lagged = 0  # how many times this connection fell behind
        self.messages_in = 0
        self.bytes_in = 0
        self.applied = 0
        self.delta_sum = 0  # of its applied adds, for the conn.closed line
        self.duplicates = 0
        self.refused = 0
        self.frames_out = 0
        self.bytes_out = 0

    @property
    def lagging(self) -> bool:
        return self.lag is not None

    def resume(self) -> None:
        """Let the handler read again (the connection drained, closed or was evicted)."""
        lag, self.lag = self.lag, None
        if lag is not None:
            lag.drained.set()

    def context(self) -> dict[str, Any]:
        """The connection's log context, for events logged outside its own task."""
        context: dict[str, Any] = {"conn": self.id, "peer": self.addr, "mode": self.mode.value}
        if self.client is not None:
            context["client"] = self.client
        if self.name is not None:
            context["name"] = self.name
        return context
