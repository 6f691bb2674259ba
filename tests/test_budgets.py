"""The add rate limit's token bucket and the per-second window, on a clock of our own."""

from __future__ import annotations

import pytest

from wstally.budgets import TokenBucket


def taken(bucket: TokenBucket, rate: float, now: float, tries: int) -> int:
    return sum(bucket.take(rate, now) for _ in range(tries))


@pytest.mark.parametrize(("rate", "burst"), [(10.0, 10), (2.5, 2), (0.5, 1)])
def test_a_second_of_burst_then_the_rate(rate: float, burst: int) -> None:
    bucket = TokenBucket(rate, 0.0)
    assert taken(bucket, rate, 0.0, 100) == burst  # at least one, even below 1/s
    assert not bucket.take(rate, 0.0)  # refused: nothing spent, still empty
    # Refilled continuously: after 1/rate seconds, exactly one more.
    assert taken(bucket, rate, 1.0 / rate, 100) == 1


def test_an_idle_bucket_fills_up_to_its_burst_only() -> None:
    bucket = TokenBucket(10.0, 0.0)
    assert taken(bucket, 10.0, 0.0, 100) == 10
    assert taken(bucket, 10.0, 3600.0, 100) == 10  # an hour idle: still one second's worth
    assert taken(bucket, 10.0, 3600.55, 100) == 5
