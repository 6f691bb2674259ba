"""``wstally.logs.scan``: lines through the filter to a sink, counted."""

from __future__ import annotations

from typing import Any

import pytest

from wstally.logs.filters import Filter
from wstally.logs.scan import Scanner, parse_line


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"event": "e"}\n', {"event": "e"}),
        (b'  {"event": "e"}\n', {"event": "e"}),  # leading whitespace: the slow way
        (b'{"event": "e"} x\n', None),  # something after the object
        (b"[1, 2]\n", None),  # JSON, not an object
        (b"\xff\xfe\n", None),  # not UTF-8
        (b'{"truncated": \n', None),
        (b"\n", None),
    ],
)
def test_parse_line(raw: bytes, expected: dict[str, Any] | None) -> None:
    assert parse_line(raw) == expected


def test_counts_and_the_first_malformed_line() -> None:
    seen: list[dict[str, Any]] = []
    scanner = Scanner(Filter(events=["keep"]), lambda _raw, event: seen.append(event))
    scanner.scan([b'{"event": "drop"}\n', b"oops\n", b"\n", b'{"event": "keep"}\n'], "a.log")
    assert seen == [{"event": "keep"}]
    counts = scanner.counts
    assert (counts.lines, counts.matched, counts.malformed) == (4, 1, 1)
    assert counts.first_malformed == "a.log:2"


def test_line_numbers_run_on_across_batches_of_one_source() -> None:
    # --follow scans each file in batches: a malformed line is named by its place in the file.
    scanner = Scanner(Filter(), lambda _raw, _event: None)
    scanner.scan([b'{"event": "e"}\n'], "a.log")
    scanner.scan([b'{"event": "e"}\n'], "b.log")
    scanner.scan([b'{"event": "e"}\n', b"bad\n"], "a.log")
    assert scanner.counts.first_malformed == "a.log:3"
    assert scanner.counts.lines == 4
