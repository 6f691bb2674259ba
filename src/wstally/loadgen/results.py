"""What a worker process hands back to the coordinator at the end of a run (pickled)."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from wstally.loadgen.sender import SenderStats

__all__ = ["NodeShare", "WatcherTotals", "WorkerFailure", "WorkerResult"]


@dataclass(frozen=True)
class NodeShare:
    """What one worker's connections to one target (node) did."""

    watchers: int
    senders: int
    items: int  # updates delivered to those watchers
    acked: int  # adds of those senders acked
    fanout_hist: bytes  # fan-out latency measured on those watchers (encoded histogram)


@dataclass(frozen=True)
class WatcherTotals:
    """What one worker's watchers saw, together."""

    items: int  # updates delivered, over every watcher
    snapshots: int
    gaps: int  # seqs missing from a watcher's stream and not covered by a snapshot
    gap_examples: list[tuple[int, int]]  # (last seq seen, next seq seen)
    states: list[tuple[int, int]]  # every distinct (seq, total) watchers ended on
    behind: int  # watchers that never reached the final seq
    # (seq, total) at the end of each frame seen, in two arrays side by side, and the
    # disagreements already found among this worker's own watchers.
    position_seqs: array[int] = field(default_factory=lambda: array("q"))
    position_totals: array[int] = field(default_factory=lambda: array("q"))
    position_conflicts: int = 0
    position_examples: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class WorkerResult:
    """One worker's run: connections, adds, deliveries, latencies, its own CPU."""

    index: int
    connected: int
    connect_failed: int
    connect_errors: list[str]  # the first few, for a debugger: the verdict counts them
    adds: SenderStats  # of every sender of the worker, summed
    unanswered: int  # adds that never got an ack or an error
    reconnects: int
    stalled: int  # readers that stopped reading after their snapshot
    watched: WatcherTotals
    connect_hist: bytes  # encoded histograms: HdrHistogram does not pickle
    ack_hist: bytes
    fanout_hist: bytes
    fanout_same_hist: bytes  # sender and watcher on one node (several nodes only)
    fanout_cross_hist: bytes  # ... on two different nodes
    nodes: list[NodeShare]  # one per target, in the order of the run's targets
    send_seconds: float
    run_seconds: float  # from go until every watcher caught up
    cpu_seconds: float  # the worker's CPU over run_seconds


@dataclass(frozen=True)
class WorkerFailure:
    """A worker that could not finish (it reports rather than leave the coordinator hanging)."""

    index: int
    fatal: str
