"""``GET /metrics``: the server's figures in Prometheus' text format.

Nothing here runs per update except :meth:`Histogram.observe` for the ack latency (a bisect
and two increments). Every other figure is a plain integer the hot path keeps anyway, read
by a custom collector only when Prometheus scrapes: prometheus_client's own Counter objects
would take a lock per increment, on the path of every add.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

__all__ = [
    "ACK_BUCKETS",
    "BATCH_BUCKETS",
    "COMMIT_BUCKETS",
    "CONTENT_TYPE",
    "Histogram",
    "Source",
    "Tallies",
    "registry_for",
    "render",
]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Seconds: an ack is a commit away (0.1-5 ms of fsync) plus the wait for the batch before.
ACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 4096)


class Histogram:
    """Cumulative-on-read bucket counts: observing costs a bisect and two increments."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_all(self, values: Sequence[float]) -> None:
        """``observe`` each of ``values`` (the acks of a commit: a call per add was 2 % of
        the server's CPU at 60,000 adds/s)."""
        counts, bounds, at = self.counts, self.bounds, bisect.bisect_left
        for value in values:
            counts[at(bounds, value)] += 1
        self.total += sum(values)

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = 0
        out: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        return out


@dataclass(slots=True)
class Tallies:
    """What the server counts for Prometheus alone (the rest it keeps for itself)."""

    enabled: bool = True  # off (--no-metrics): the per-add ack latency is not observed
    refused: dict[str, int] = field(default_factory=dict)
    replays: dict[str, int] = field(default_factory=lambda: {"recovered": 0, "not_recovered": 0})
    ack_seconds: Histogram = field(default_factory=lambda: Histogram(ACK_BUCKETS))
    commit_seconds: Histogram = field(default_factory=lambda: Histogram(COMMIT_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))


class Source(Protocol):
    """The narrow view of a server the collector reads (see TallyServer.metrics_view)."""

    def figures(self) -> dict[str, float]: ...

    def connections(self) -> dict[str, int]: ...

    def engine(self) -> dict[str, str]: ...

    def tallies(self) -> Tallies: ...


# name (without _total for counters), kind, help text; values from Source.figures().
_SCALARS = (
    ("adds_applied", "counter", "Adds applied (acknowledged, or broadcast for plain clients)."),
    ("adds_duplicate", "counter", "Resent adds answered with the original result."),
    ("deliveries", "counter", "Updates written: one per update per following client."),
    ("sent_bytes", "counter", "Bytes written to WebSocket connections."),
    ("lagging_connections", "gauge", "Connections skipped for a full write buffer, right now."),
    ("lag_episodes", "counter", "Times a connection fell behind and was skipped."),
    ("evicted", "counter", "Connections closed for not reading (4008)."),
    ("connections_opened", "counter", "WebSocket connections opened."),
    ("flow_blocked", "counter", "Times reading stopped because commits or broadcasts lagged."),
    ("seq", "gauge", "The last committed update's seq."),
    ("engine_up", "gauge", "1 when the engine commits, 0 while it is degraded."),
    (
        "loop_cpu_wait_ratio",
        "gauge",
        "Share of the event loop's last 0.5 s or more spent waiting for a CPU "
        "(Linux; read as a broadcast ends; over 0.12, broadcasts are spaced wider).",
    ),
)


class _Collector:
    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        source = self.source
        figures = source.figures()
        for name, kind, text in _SCALARS:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"wstally_{name}", text, value=figures[name])
        connections = GaugeMetricFamily(
            "wstally_connections", "Connected WebSocket clients, by mode.", labels=["mode"]
        )
        for mode, count in source.connections().items():
            connections.add_metric([mode], count)
        yield connections
        tallies = source.tallies()
        refused = CounterMetricFamily(
            "wstally_adds_refused", "Adds refused, by error code.", labels=["code"]
        )
        for code, count in sorted(tallies.refused.items()):
            refused.add_metric([code], count)
        yield refused
        replays = CounterMetricFamily(
            "wstally_replays",
            "Returning clients (hello with since), by outcome.",
            labels=["outcome"],
        )
        for outcome, count in tallies.replays.items():
            replays.add_metric([outcome], count)
        yield replays
        yield _histogram(
            "wstally_ack_seconds", "From an add's arrival to its ack.", tallies.ack_seconds
        )
        yield _histogram(
            "wstally_commit_seconds", "Time the engine took per batch.", tallies.commit_seconds
        )
        yield _histogram("wstally_commit_batch_size", "Adds per batch.", tallies.batch_size)
        engine = source.engine()
        info = GaugeMetricFamily(
            "wstally_engine_info", "The engine behind this node.", labels=sorted(engine)
        )
        info.add_metric([engine[k] for k in sorted(engine)], 1)
        yield info


def _histogram(name: str, text: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, text, buckets=histogram.buckets(), sum_value=histogram.total)


def registry_for(source: Source) -> CollectorRegistry:
    """A registry of this server's figures and the process's (CPU, memory, fds)."""
    # Not described at registration: the server is still being built when this is called.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(source))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
