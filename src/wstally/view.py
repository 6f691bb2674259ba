"""What ``/metrics`` and ``server.stats`` read of a server: its figures, through one narrow
view (metrics.Source, stats.Source), never its internals' structure."""

from __future__ import annotations

from typing import Protocol

from wstally.batcher import Batcher, CommitWindow
from wstally.engine.base import Engine, Position
from wstally.flow import Flow
from wstally.hub import Hub
from wstally.metrics import Tallies

__all__ = ["Host", "ServerView"]


class Counts(Protocol):
    """The connection handler's counters (handler.Handler has them)."""

    opened: int
    closed: int
    refused: int


class Host(Protocol):
    """The parts of a server the view reads (a TallyServer is one)."""

    @property
    def handler(self) -> Counts: ...

    batcher: Batcher
    hub: Hub
    engine: Engine
    flow: Flow
    tallies: Tallies

    @property
    def position(self) -> Position: ...


class ServerView:
    """What /metrics and server.stats read of a server: figures, not its internals."""

    def __init__(self, server: Host) -> None:
        self.server = server

    def figures(self) -> dict[str, float]:
        server = self.server
        hub, batcher = server.hub, server.batcher
        return {
            "adds_applied": batcher.committed,
            "adds_duplicate": batcher.duplicates,
            "deliveries": hub.deliveries,
            "sent_bytes": hub.bytes_sent,
            "lagging_connections": len(hub.lagging),
            "lag_episodes": hub.skipped,
            "evicted": hub.evicted,
            "connections_opened": server.handler.opened,
            "flow_blocked": server.flow.blocks,
            "seq": server.position.seq,
            "engine_up": 0 if server.engine.status().get("degraded") else 1,
            "loop_cpu_wait_ratio": hub.contention.share,
        }

    def connections(self) -> dict[str, int]:
        return {mode.value: count for mode, count in self.server.hub.by_mode.items()}

    # For server.stats (stats.Source)

    def counters(self) -> dict[str, int]:
        server = self.server
        return {
            "opened": server.handler.opened,
            "closed": server.handler.closed,
            "refused": server.handler.refused,
            "committed": server.batcher.committed,
            "deliveries": server.hub.deliveries,
            "lagged": server.hub.skipped,
        }

    def gauges(self) -> dict[str, int]:
        server = self.server
        position = server.position
        return {
            "connections": server.hub.clients,
            "lagging": len(server.hub.lagging),
            "seq": position.seq,
            "total": position.total,
        }

    def take_window(self) -> CommitWindow:
        return self.server.batcher.take_window()

    def engine(self) -> dict[str, str]:
        status = self.server.engine.status()
        return {k: str(status[k]) for k in ("engine", "node") if k in status}

    def tallies(self) -> Tallies:
        return self.server.tallies
