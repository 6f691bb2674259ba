"""What the coordinator reads from the servers themselves: their position (/healthz), the
CPU and memory of local ones (/proc), and Redis's own accounting (INFO)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from wstally.loadgen.server_proc import ProcReader, healthz, redis_info
from wstally.loadgen.targets import Targets

__all__ = ["Health", "Observations", "Probe", "Usage", "agree", "furthest"]

Health = dict[str, Any]  # a /healthz body: seq, total, epoch, evicted, ...
REDIS_SECTIONS = ("cpu", "commandstats")


@dataclass(frozen=True)
class Usage:
    """Every local server's CPU seconds and memory, and Redis's, at one moment."""

    cpu: list[float | None]  # None where the process is not local (or gone)
    memory: list[dict[str, int]]  # VmRSS, VmHWM in KiB
    redis: dict[str, dict[str, str]]  # INFO sections; empty without --nodes
    redis_cpu: float | None


@dataclass(frozen=True)
class Observations:
    """The servers, seen by the coordinator over one run."""

    connect_seconds: float  # until every worker had connected
    send_seconds: float  # from go until every worker's senders finished
    starts: list[Health]  # every target's position at go
    finals: list[Health]  # ... once the senders finished
    before: Usage  # at go
    during: list[dict[str, int]]  # memory with every connection still open
    after: Usage  # once every worker reported

    @property
    def start(self) -> Health:
        return furthest(self.starts)

    @property
    def final(self) -> Health:
        # The furthest node: the others can only be behind it (and the verdict says so).
        return furthest(self.finals)


def furthest(bodies: list[Health]) -> Health:
    """The position of the node furthest on (the highest seq)."""
    return max(bodies, key=lambda b: int(b["seq"]))


def agree(bodies: list[Health]) -> bool:
    """Every node at one position (seq, total, epoch)."""
    return len({(b.get("seq"), b.get("total"), b.get("epoch")) for b in bodies}) == 1


class Probe:
    """Reads the servers of a run; the same instruments before, during and after it."""

    def __init__(self, targets: Targets, cafile: str | None, token: str | None) -> None:
        self.targets = targets
        self.tls = targets.health_tls(cafile)
        self.token = token
        self.procs = [ProcReader(pid) if pid is not None else None for pid in targets.pids]
        redis = targets.redis
        self.redis_proc = ProcReader(redis.proc.pid) if redis and redis.proc else None

    def positions(self, patience: float) -> list[Health]:
        """Every target's /healthz; with several, until they agree or ``patience`` is over
        (a node's position follows the shared feed: it may trail another by a moment)."""
        deadline = time.monotonic() + patience
        while True:
            wait = max(0.0, deadline - time.monotonic())
            bodies = [self._health(host, port, wait) for host, port in self.targets.addresses]
            if agree(bodies) or time.monotonic() >= deadline:
                return bodies
            time.sleep(0.05)

    def _health(self, host: str, port: int, patience: float) -> Health:
        # A server that is restarting (--reconnect) answers again within the patience.
        deadline = time.monotonic() + patience
        while True:
            try:
                return healthz(host, port, tls=self.tls, token=self.token)
            except OSError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    def memory(self) -> list[dict[str, int]]:
        return [p.memory_kib() if p else {} for p in self.procs]

    def usage(self) -> Usage:
        return Usage(
            cpu=[p.cpu_seconds() if p else None for p in self.procs],
            memory=self.memory(),
            redis=self._redis_stats(),
            redis_cpu=self.redis_proc.cpu_seconds() if self.redis_proc else None,
        )

    def _redis_stats(self) -> dict[str, dict[str, str]]:
        redis = self.targets.redis
        if redis is None:
            return {}
        return {section: redis_info(redis.host, redis.port, section) for section in REDIS_SECTIONS}
