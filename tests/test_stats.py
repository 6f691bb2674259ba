"""server.stats from a narrow source: differences over the interval, gauges as they are."""

from __future__ import annotations

from wstally.batcher import CommitWindow
from wstally.stats import COUNTERS, StatsLogger, rss_kib


class Figures:
    """A stats source (stats.Source) whose numbers the test sets."""

    def __init__(self) -> None:
        self.values = dict.fromkeys(COUNTERS, 0)
        self.window = CommitWindow()

    def counters(self) -> dict[str, int]:
        return dict(self.values)

    def gauges(self) -> dict[str, int]:
        return {"connections": 3, "lagging": 1, "seq": 42, "total": 420}

    def take_window(self) -> CommitWindow:
        window, self.window = self.window, CommitWindow()
        return window


def test_each_interval_reports_what_changed_in_it() -> None:
    source = Figures()
    stats = StatsLogger(source, 10.0)
    source.values.update(opened=5, closed=2, committed=100, deliveries=300, refused=1)
    source.window = CommitWindow(commits=4, updates=100, max_batch=40, max_seconds=0.002)
    first = stats.figures()
    assert (first["opened"], first["closed"], first["updates"]) == (5, 2, 100)
    assert (first["deliveries"], first["refused"]) == (300, 1)
    assert (first["commits"], first["batch_mean"], first["batch_max"]) == (4, 25.0, 40)
    assert first["commit_max_ms"] == 2.0
    assert (first["connections"], first["lagging"], first["seq"], first["total"]) == (
        3,
        1,
        42,
        420,
    )
    second = stats.figures()  # nothing happened since
    assert (second["updates"], second["commits"], second["batch_mean"]) == (0, 0, 0.0)


def test_rss_is_read_from_proc() -> None:
    rss = rss_kib()
    assert rss is None or rss > 1000
