"""The pacer on its own: unpaced until refused, cut once per burst, growing back slowly."""

from __future__ import annotations

import pytest

from wstally.client.pacing import CEILING, CUT, FLOOR, GROWTH, MAX_RATE, SLICE, Pacer


def send_burst(pacer: Pacer, count: int, start: float, spacing: float) -> float:
    now = start
    for _ in range(count):
        assert pacer.delay(now) == 0.0
        pacer.sent(now)
        now += spacing
    return now


def greedy(pacer: Pacer, start: float, seconds: float) -> int:
    """How many adds a sender that sends whenever allowed gets out in ``seconds``."""
    sent, now = 0, start
    while now < start + seconds:
        wait = pacer.delay(now)
        if wait == 0.0:
            pacer.sent(now)
            sent += 1
        else:
            now += wait
    return sent


def test_unpaced_until_the_first_refusal_yet_under_the_frame_budget() -> None:
    pacer = Pacer()
    sent = greedy(pacer, 0.0, 1.0)
    assert pacer.rate(1.0) is None
    assert pacer.cuts == 0
    # The server closes a connection past 20,000 frames in a second, adds or not.
    assert MAX_RATE * 0.95 <= sent <= MAX_RATE * (1 + SLICE) < 20_000


def test_the_first_refusal_paces_below_the_rate_it_was_sending_at() -> None:
    pacer = Pacer()
    now = send_burst(pacer, 1000, 0.0, 0.0005)  # 2,000 adds/s for half a second
    assert pacer.refused(sent_at=now - 0.001, now=now)
    assert pacer.rate(now) == pytest.approx(1000 * CUT)
    # Sending now waits: the bucket starts empty.
    assert pacer.delay(now) == pytest.approx(1 / (1000 * CUT))


def test_refusals_of_adds_sent_before_the_cut_cut_nothing_more() -> None:
    pacer = Pacer()
    now = send_burst(pacer, 500, 0.0, 0.001)
    assert pacer.refused(sent_at=now - 0.01, now=now)
    rate = pacer.rate(now)
    for _ in range(100):  # the rest of the burst, already on the wire
        assert not pacer.refused(sent_at=now - 0.005, now=now + 0.001)
    assert pacer.cuts == 1
    assert pacer.rate(now) == rate
    # An add sent after the cut and still refused is news: cut again.
    assert pacer.refused(sent_at=now + 0.01, now=now + 0.02)
    assert pacer.cuts == 2


def test_the_pace_grows_back_slowly_up_to_a_ceiling() -> None:
    pacer = Pacer()
    now = send_burst(pacer, 100, 0.0, 0.01)
    pacer.refused(now, now)
    base = pacer.rate(now)
    assert base is not None
    assert pacer.rate(now + 1.0) == pytest.approx(base * (1 + GROWTH))
    assert pacer.rate(now + 1000.0) == pytest.approx(base * CEILING)


def test_paced_sends_are_spaced_but_leave_in_small_slices() -> None:
    pacer = Pacer()
    now = send_burst(pacer, 2000, 0.0, 0.0005)
    pacer.refused(now, now)
    sent = greedy(pacer, now, 1.0)
    rate = pacer.rate(now)
    assert rate is not None
    assert rate * 0.9 <= sent <= rate * (1 + GROWTH) * 1.1


def test_never_slower_than_the_floor() -> None:
    pacer = Pacer()
    for i in range(50):
        pacer.refused(float(i), float(i))
    assert pacer.rate(50.0) is not None
    assert pacer.base == FLOOR
