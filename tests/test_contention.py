"""The loop thread's wait for a CPU, read from a schedstat file."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from wstally.contention import Contention


def schedstat(path: Path, delay_ns: int) -> None:
    # The format of /proc/<pid>/task/<tid>/schedstat: on-CPU ns, waiting ns, timeslices.
    path.write_text(f"123456789 {delay_ns} 42\n")


def test_the_share_of_a_window_spent_waiting_decides(tmp_path: Path) -> None:
    stat = tmp_path / "schedstat"
    schedstat(stat, 5_000_000_000)
    contention = Contention(str(stat), window=0.5, threshold=0.2, release=0.1)
    assert contention.update(100.0) is False  # the first look only starts a window
    schedstat(stat, 5_300_000_000)
    assert contention.update(101.0) is True  # 0.3 s of 1 s spent waiting
    assert contention.share == pytest.approx(0.3)
    schedstat(stat, 5_400_000_000)
    assert contention.update(101.2) is True  # within the window: not read again
    assert contention.share == pytest.approx(0.3)
    schedstat(stat, 5_450_000_000)
    assert contention.update(102.0) is True  # 0.15 s of 1 s: above the release
    assert contention.share == pytest.approx(0.15)
    schedstat(stat, 5_500_000_000)
    assert contention.update(103.0) is False  # 0.05 s of 1 s
    schedstat(stat, 5_650_000_000)
    assert contention.update(104.0) is False  # 0.15 s again: below the threshold


def test_an_unreadable_count_is_no_contention(tmp_path: Path) -> None:
    missing = Contention(str(tmp_path / "absent"), window=0.0)
    assert [missing.update(t) for t in (1.0, 2.0, 3.0)] == [False, False, False]
    assert not missing.available
    garbled = tmp_path / "garbled"
    garbled.write_text("not numbers\n")
    contention = Contention(str(garbled), window=0.0)
    assert [contention.update(t) for t in (1.0, 2.0)] == [False, False]
    assert not contention.available


def own_schedstat() -> Path:
    return Path(f"/proc/self/task/{threading.get_native_id()}/schedstat")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not own_schedstat().exists(),
    reason="Linux's schedstat (CONFIG_SCHED_INFO)",
)
def test_the_running_thread_is_read_from_proc() -> None:
    contention = Contention(window=0.0)
    contention.update(time.monotonic())
    until = time.monotonic() + 0.05
    while time.monotonic() < until:
        pass
    contention.update(time.monotonic())
    # A real count was read and compared: a share of the window, whatever the machine does.
    assert contention.available
    assert 0 <= contention.delay <= int(own_schedstat().read_text().split()[1])
    assert contention.share >= 0.0
    contention.close()
    assert not contention.available
    assert contention.update(time.monotonic() + 1) is False
