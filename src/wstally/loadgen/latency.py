"""Fan-out latency: from an add's send time to its arrival at a watcher, for sampled seqs."""

from __future__ import annotations

from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

from wstally.loadgen.histograms import micros, new_histogram
from wstally.loadgen.shared import SendRing
from wstally.loadgen.watcher import Samples

__all__ = ["FanoutLatency", "fanout_latency"]


@dataclass
class FanoutLatency:
    every: HdrHistogram = field(default_factory=new_histogram)
    same: HdrHistogram = field(default_factory=new_histogram)  # sender on the watcher's node
    cross: HdrHistogram = field(default_factory=new_histogram)  # sender on another node
    by_target: list[HdrHistogram] = field(default_factory=list)  # by the watcher's node


def fanout_latency(samples: list[Samples], ring: SendRing) -> FanoutLatency:
    """Match each sampled arrival (``samples[u]``: watchers on target u) to its send time.

    The send time was recorded by whichever worker's sender got the ack; with several
    targets, the sender's target tells same-node from cross-node deliveries apart.
    """
    latency = FanoutLatency(by_target=[new_histogram() for _ in samples])
    several = len(samples) > 1
    for u, (seqs, times) in enumerate(samples):
        for seq, arrived in zip(seqs, times, strict=True):
            sent, origin = ring.lookup(seq)
            if sent <= 0 or sent > arrived:
                continue  # never acked in this run, or its slot already reused
            value = micros(arrived - sent)
            latency.every.record_value(value)
            latency.by_target[u].record_value(value)
            if several:
                (latency.same if origin == u else latency.cross).record_value(value)
    return latency
