"""Latency histograms: recorded in the workers, merged and summarised by the coordinator."""

from __future__ import annotations

from collections.abc import Iterable

from hdrh.histogram import HdrHistogram

__all__ = ["LatencyCounts", "merge", "micros", "new_histogram", "percentiles"]

# Latencies are recorded in microseconds, from 1 µs to 10 minutes, 3 significant digits.
HIST_MAX_US = 600_000_000
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, HIST_MAX_US, 3)


def micros(seconds: float) -> int:
    """A duration as a histogram value: whole microseconds, at least 1."""
    return max(1, int(seconds * 1e6))


class LatencyCounts:
    """Latencies counted by whole microsecond during a run, made a histogram after it.

    hdrh's record_value is pure Python (about 2 µs): at 50,000 acks a second it was 11 % of
    the generator's core, which then capped the ingest it could measure. A dict increment
    is a tenth of that, and the histogram is built once, from the distinct values only.
    """

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def record(self, seconds: float) -> None:
        us = micros(seconds)
        counts = self.counts
        counts[us] = counts.get(us, 0) + 1

    def histogram(self) -> HdrHistogram:
        hist = new_histogram()
        for value, count in self.counts.items():
            hist.record_value(value, count)
        return hist


def merge(encoded: Iterable[bytes]) -> HdrHistogram:
    """One histogram from the encoded ones of every worker (histograms do not pickle)."""
    merged = new_histogram()
    for blob in encoded:
        merged.decode_and_add(blob)
    return merged


def percentiles(hist: HdrHistogram) -> dict[str, float]:
    """p50 to p99.9 and max in milliseconds, and the count; empty when nothing was recorded."""
    if hist.get_total_count() == 0:
        return {}
    out = {f"p{p:g}": hist.get_value_at_percentile(p) / 1000 for p in PERCENTILES}
    out["max"] = hist.get_max_value() / 1000
    out["count"] = hist.get_total_count()
    return out
