"""``server.stats``: the server's figures over the last interval, logged every N seconds.

Counters are plain integers the hot path already keeps (or bumps once per connection or
refusal); this module only reads them every interval and logs the differences, so the
stats cost nothing per update.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wstally import logsetup

if TYPE_CHECKING:
    from wstally.server import TallyServer

__all__ = ["Counters", "StatsLogger", "rss_kib"]

log = logsetup.get_logger("wstally.stats")

_STATUS = Path("/proc/self/status")


def rss_kib() -> int | None:
    """Resident set size of this process in KiB (Linux), or None where /proc is absent."""
    try:
        with _STATUS.open() as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(slots=True)
class Counters:
    """Monotonic counters, read at the start of each interval."""

    at: float
    cpu: float
    opened: int
    closed: int
    refused: int
    committed: int
    deliveries: int
    lagged: int

    @classmethod
    def read(cls, server: TallyServer) -> Counters:
        return cls(
            at=time.monotonic(),
            cpu=time.process_time(),
            opened=server.opened,
            closed=server.closed,
            refused=server.refused,
            committed=server.batcher.committed,
            deliveries=server.hub.deliveries,
            lagged=server.hub.skipped,
        )


class StatsLogger:
    """Logs ``server.stats`` every ``interval`` seconds while the server runs."""

    def __init__(self, server: TallyServer, interval: float) -> None:
        self.server = server
        self.interval = interval
        self._last = Counters.read(server)
        server.batcher.take_window()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.log()

    def figures(self) -> dict[str, Any]:
        server = self.server
        now = Counters.read(server)
        last, self._last = self._last, now
        window = server.batcher.take_window()
        elapsed = max(now.at - last.at, 1e-9)
        updates = now.committed - last.committed
        deliveries = now.deliveries - last.deliveries
        return {
            "interval": round(elapsed, 3),
            "connections": server.hub.clients,
            "opened": now.opened - last.opened,
            "closed": now.closed - last.closed,
            "updates": updates,
            "updates_per_s": round(updates / elapsed, 1),
            "deliveries": deliveries,
            "deliveries_per_s": round(deliveries / elapsed, 1),
            "refused": now.refused - last.refused,
            "commits": window.commits,
            "batch_mean": round(window.updates / window.commits, 1) if window.commits else 0.0,
            "batch_max": window.max_batch,
            "commit_max_ms": round(window.max_seconds * 1000, 3),
            "lagging": len(server.hub.lagging),
            "lagged": now.lagged - last.lagged,
            "seq": server.position.seq,
            "total": server.position.total,
            "cpu_s": round(now.cpu - last.cpu, 3),
            "rss_kib": rss_kib(),
        }

    def log(self) -> None:
        log.info("server.stats", **self.figures())
