"""Pacing adds to what the server accepts, learnt from its ``rate_limited`` refusals.

The server refuses adds beyond its per-connection rate limit with ``rate_limited`` and
applies nothing: the add may simply be sent again later. Its limit is not announced, so a
sender learns it the way TCP learns a path's capacity: unpaced until the first refusal,
then 70% of the rate it was sending at, growing again slowly while nothing is refused, and
cut once more at the next refusal (additive increase, multiplicative decrease).

Whatever the pace, a sender never goes above MAX_RATE: the server closes a connection
that sends more than 20,000 frames in a second (code 1008), adds or not.

Sans-I/O: the caller passes the time and does the sleeping and the sending.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["Pacer"]

FLOOR = 1.0  # adds/s: the slowest pace, however many refusals
MAX_RATE = 16_000.0  # adds/s: the fastest, with room under the server's 20,000 frames/s
CUT = 0.7  # a refusal cuts the pace to this fraction (as TCP CUBIC does its window)
GROWTH = 0.1  # after a cut, the pace grows by this fraction of the cut pace per second
CEILING = 4.0  # ... up to this multiple of it; the next refusal cuts it again
SLICE = 0.02  # seconds: adds due within this much time leave together, not one per sleep
WINDOW = 1.0  # seconds of sends that make the first estimate of the sending rate


class Pacer:
    """When the next add may be sent; :meth:`refused` slows it down."""

    def __init__(self) -> None:
        self.base: float | None = None  # adds/s after the last cut; None: unpaced
        self.cuts = 0
        self._cut_at = -math.inf
        self._tokens = 0.0
        self._filled_at = -math.inf  # the first send finds a full slice
        self._recent: deque[float] = deque()  # send times within WINDOW, until the first cut

    def rate(self, now: float) -> float | None:
        """The current pace in adds/s, or None when not paced yet (then: MAX_RATE)."""
        if self.base is None:
            return None
        return min(MAX_RATE, self.base * min(CEILING, 1.0 + GROWTH * (now - self._cut_at)))

    def delay(self, now: float) -> float:
        """Seconds to wait before the next send: 0 when it may go now."""
        rate = self.rate(now) or MAX_RATE
        self._refill(now, rate)
        # (A hair below one is one: else float rounding could ask for a zero-length wait.)
        return 0.0 if self._tokens > 1.0 - 1e-9 else (1.0 - self._tokens) / rate

    def sent(self, now: float) -> None:
        self._tokens -= 1.0
        if self.base is None:
            self._recent.append(now)
            while self._recent[0] < now - WINDOW:
                self._recent.popleft()

    def refused(self, sent_at: float, now: float) -> bool:
        """A ``rate_limited`` refusal of an add sent at ``sent_at``; True if the pace was cut.

        Adds sent before the last cut were sent too fast already: their refusals are the
        same news, and cut nothing more.
        """
        if sent_at < self._cut_at:
            return False
        current = self.rate(now)
        if current is None:
            current = len(self._recent) / WINDOW
            self._recent.clear()
        self.base = min(MAX_RATE, max(FLOOR, current * CUT))
        self.cuts += 1
        self._cut_at = self._filled_at = now
        self._tokens = 0.0
        return True

    def _refill(self, now: float, rate: float) -> None:
        burst = max(1.0, rate * SLICE)
        self._tokens = min(burst, self._tokens + (now - self._filled_at) * rate)
        self._filled_at = now
