"""``wstally.logs.filters``: --event, --level, --client, --conn, --since/--until, --where."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from logcases import LINES, logs, picked
from wstally.logs.filters import Condition, Filter

pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--event", "conn.closed"], [11, 12, 15]),
        (["--event", "conn.*"], [2, 3, 5, 8, 11, 12, 15]),
        (["--event", "store.*", "--event", "server.s?a*"], [0, 10, 13, 14]),
        (["--event", "connection open"], [1]),
        (["--level", "warning"], [9, 13]),
        (["--level", "info", "--event", "update.*"], [7]),
        (["--client", "c-ann"], [3, 4, 11]),
        (["--client", "ann"], [3, 4, 11]),  # the display name works too
        (["--conn", "cccc"], [5, 6, 7, 12]),
        (["--conn", "cccc00000003", "--event", "update.applied"], [6]),
        (["--where", "code=1006"], [12]),
        (["--where", "code!=1000", "--event", "conn.closed"], [12, 15]),
        (["--where", "duration>6.5"], [11, 12]),
        (["--where", "duration>=6.5", "--where", "lagged<1"], [11, 12]),
        (["--where", "mode=plain", "--where", "delta<0"], [6]),
        (["--where", "id=null", "--event", "update.*"], [6, 7]),
        (["--since", "2026-11-24T10:00:10Z", "--until", "2026-11-24T10:00:12Z"], [11, 12, 13]),
        (["--event", "no.such.event"], []),
    ],
)
def test_filters(
    monkeypatch: pytest.MonkeyPatch, logfile: Path, args: list[str], expected: list[int]
) -> None:
    result = logs(monkeypatch, "--json", *args, str(logfile))
    assert result.code == 0, result.err
    assert result.lines == picked(*expected)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "last tuesday"], "not a time"),
        (["--where", "code"], "expected FIELD=VALUE"),
        (["--level", "loud"], "--level"),
    ],
)
def test_bad_options(
    monkeypatch: pytest.MonkeyPatch, logfile: Path, args: list[str], message: str
) -> None:
    result = logs(monkeypatch, *args, str(logfile))
    assert result.code == 2
    assert message in result.err


def test_where_conditions() -> None:
    assert Condition.parse("duration >= 6.5") == Condition("duration", ">=", "6.5")
    assert Condition("code", "=", "[1000]")({"code": [1000]})  # compared as compact JSON
    assert Condition("gone", "!=", "x")({})  # a missing field differs from any value
    assert not Condition("applied", ">", "0")({"applied": "many"})  # not a number: no match


@pytest.mark.parametrize(
    "flt",
    [
        Filter(events=["conn.closed"]),
        Filter(events=["conn.*", "server.s?a*"]),
        Filter(client="ann"),
        Filter(conn="cccc"),
        Filter(where=[Condition("code", "=", "1006"), Condition("mode", "=", "plain")]),
        Filter(events=["*"], client="c-bob"),
    ],
)
def test_the_prefilter_never_drops_a_matching_line(flt: Filter) -> None:
    # It may let through lines the matcher then refuses, never the other way round.
    pre, match = flt.prefilter(), flt.matcher()
    assert pre is not None
    assert match is not None
    for text in LINES:
        if match(json.loads(text)):
            assert pre(text.encode()), text


def test_no_filter_means_no_test() -> None:
    assert Filter().prefilter() is None
    assert Filter().matcher() is None
    assert Filter(events=["*"]).prefilter() is None  # no literal to look for
