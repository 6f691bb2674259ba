"""Whether the event loop's thread waits for a CPU: others on this machine want the core.

Linux counts, per thread, the time it was runnable but not running (the second field of
``/proc/<pid>/task/<tid>/schedstat``, in nanoseconds). Over a window of wall time, that
delay's share says whether the CPU is contended. At 1,000 watchers x 1,000 updates/s, over
windows of 0.5 s (p10-p90): on a core of its own, the server's loop waited 4-7 % of the
time; two nodes, Redis and the load generator sharing two cores, 17-34 %
(docs/benchmarks.md, ninth session).

The hub spends less CPU on broadcasts when it is (``hub.SPACING_CONTENDED``): closer
rounds buy latency with CPU, which a contended machine takes from everything else, acks
included. Where the count cannot be read (not Linux), or stays at zero (a kernel that does
not keep it), the CPU is taken as uncontended.
"""

from __future__ import annotations

import os
import threading

__all__ = ["RELEASE", "THRESHOLD", "WINDOW", "Contention"]

# Read at most this often (seconds of the caller's clock): one pread, a few microseconds.
WINDOW = 0.5
# The share of wall time spent waiting for a CPU above which it counts as contended
# (between the two cases above), and below which it no longer does: the hub's own spacing
# moves the share it then measures, and should not flip with every window.
THRESHOLD = 0.12
RELEASE = 0.08


class Contention:
    """The calling thread's wait for a CPU, sampled at most once per ``window``."""

    def __init__(
        self,
        path: str | None = None,
        window: float = WINDOW,
        threshold: float = THRESHOLD,
        release: float = RELEASE,
    ) -> None:
        # Opened on first use, in the thread it measures (the loop's), unless given.
        self._path = path
        self._fd: int | None = None
        self._failed = False
        self.window = window
        self.threshold = threshold
        self.release = release
        self.contended = False
        self.share = 0.0  # of the last complete window
        self._at: float | None = None
        self.delay = 0  # ns spent waiting for a CPU, as of the last read

    def update(self, now: float) -> bool:
        """Whether the CPU is contended, as of the last window that ended by ``now``."""
        if self._at is not None and now - self._at < self.window:
            return self.contended
        delay = self._read()
        if delay is None:
            return False
        if self._at is not None and now > self._at:
            self.share = (delay - self.delay) / 1e9 / (now - self._at)
            self.contended = self.share > (self.release if self.contended else self.threshold)
        self._at, self.delay = now, delay
        return self.contended

    @property
    def available(self) -> bool:
        """Whether the count can be read (so far)."""
        return not self._failed

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._failed = True
        self.contended = False
        self.share = 0.0

    def _read(self) -> int | None:
        if self._fd is None:
            if self._failed:
                return None
            path = self._path or f"/proc/self/task/{threading.get_native_id()}/schedstat"
            try:
                self._fd = os.open(path, os.O_RDONLY)
            except OSError:
                self._failed = True
                return None
        try:
            return int(os.pread(self._fd, 128, 0).split()[1])
        except (OSError, ValueError, IndexError):
            self.close()
            return None
