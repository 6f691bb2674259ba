"""The broadcast's backlog: updates by seq, handed out by range, trimmed from the front."""

from __future__ import annotations

import json

import pytest

from wstally import protocol
from wstally.backlog import Backlog
from wstally.tally import Update


def updates(first: int, count: int) -> list[Update]:
    return [Update(n, 1, n, 0.0, "c", name=f"n{n}") for n in range(first, first + count)]


def test_ranges_by_seq_with_their_items() -> None:
    backlog = Backlog(10)
    assert backlog.head == 10
    backlog.extend(updates(11, 5))
    backlog.extend(updates(16, 2))
    assert backlog.head == 17
    part, items = backlog.between(12, 15)
    assert [u.seq for u in part] == [13, 14, 15]
    assert [json.loads(i)["seq"] for i in items] == [13, 14, 15]
    # The items are those an updates frame carries: joined, the same frame as encoded whole.
    assert protocol.encode_updates(part, items) == protocol.encode_updates(part)
    assert backlog.between(17, 17) == ([], [])


def test_trim_forgets_what_everyone_was_written() -> None:
    backlog = Backlog(0)
    backlog.extend(updates(1, 6))
    backlog.trim(4)
    assert (backlog.base, backlog.head) == (4, 6)
    assert [u.seq for u in backlog.between(4, 6)[0]] == [5, 6]
    backlog.trim(2)  # behind the base already: nothing to do
    assert (backlog.base, len(backlog.updates), len(backlog.items)) == (4, 2, 2)
    backlog.trim(6)
    assert (backlog.base, backlog.head, backlog.updates, backlog.items) == (6, 6, [], [])


def test_reset_starts_over_at_a_new_position() -> None:
    backlog = Backlog(0)
    backlog.extend(updates(1, 3))
    backlog.reset(50)
    assert (backlog.base, backlog.head, backlog.between(50, 50)) == (50, 50, ([], []))


def test_an_update_that_cannot_be_encoded_leaves_it_whole() -> None:
    backlog = Backlog(0)
    backlog.extend(updates(1, 2))
    bad = Update(3, 1, 3, 0.0, "c", name=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        backlog.extend([bad])
    assert (backlog.head, len(backlog.items)) == (2, 2)
