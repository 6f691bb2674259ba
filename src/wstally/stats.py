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
from typing import Any, Protocol

from wstally import logsetup
from wstally.batcher import CommitWindow

__all__ = ["COUNTERS", "Counters", "Source", "StatsLogger", "rss_kib"]

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


# The monotonic counters read at the start of each interval (their differences are logged).
COUNTERS = ("opened", "closed", "refused", "committed", "deliveries", "lagged")


class Source(Protocol):
    """What the stats read of a server: counters, gauges and the commit window."""

    def counters(self) -> dict[str, int]: ...

    def gauges(self) -> dict[str, int]: ...

    def take_window(self) -> CommitWindow: ...


@dataclass(slots=True)
class Counters:
    """Monotonic counters, read at the start of each interval."""

    at: float
    cpu: float
    values: dict[str, int]

    @classmethod
    def read(cls, source: Source) -> Counters:
        return cls(at=time.monotonic(), cpu=time.process_time(), values=source.counters())


class StatsLogger:
    """Logs ``server.stats`` every ``interval`` seconds while the server runs."""

    def __init__(self, source: Source, interval: float) -> None:
        self.source = source
        self.interval = interval
        self._last = Counters.read(source)
        source.take_window()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.log()

    def figures(self) -> dict[str, Any]:
        source = self.source
        now = Counters.read(source)
        last, self._last = self._last, now
        window = source.take_window()
        gauges = source.gauges()
        elapsed = max(now.at - last.at, 1e-9)
        delta = {k: now.values[k] - last.values[k] for k in COUNTERS}
        return {
            "interval": round(elapsed, 3),
            "connections": gauges["connections"],
            "opened": delta["opened"],
            "closed": delta["closed"],
            "updates": delta["committed"],
            "updates_per_s": round(delta["committed"] / elapsed, 1),
            "deliveries": delta["deliveries"],
            "deliveries_per_s": round(delta["deliveries"] / elapsed, 1),
            "refused": delta["refused"],
            "commits": window.commits,
            "batch_mean": round(window.updates / window.commits, 1) if window.commits else 0.0,
            "batch_max": window.max_batch,
            "commit_max_ms": round(window.max_seconds * 1000, 3),
            "lagging": gauges["lagging"],
            "lagged": delta["lagged"],
            "seq": gauges["seq"],
            "total": gauges["total"],
            "cpu_s": round(now.cpu - last.cpu, 3),
            "rss_kib": rss_kib(),
        }

    def log(self) -> None:
        log.info("server.stats", **self.figures())
