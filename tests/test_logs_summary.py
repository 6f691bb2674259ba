"""``wstally.logs.summary``: the --summary figures, aggregated line by line."""

from __future__ import annotations

import json

from logcases import LINES
from logfiles import ts
from wstally.logs.summary import Summary


def summarized(lines: list[str], top: int = 5) -> Summary:
    summary = Summary(top)
    for text in lines:
        summary.add(json.loads(text))
    return summary


def test_summary_figures() -> None:
    summary = summarized(LINES)
    assert summary.events[("conn.closed", "info")] == 3
    assert summary.events[("update.applied", "debug")] == 2
    keys = (("name", "ann"), ("host", "(plain) 10.0.0.3"), ("id", "c-bob"))
    ann, plain, bob = (summary.clients[k] for k in keys)
    assert (ann.ids, plain.ids, bob.ids) == ({"c-ann"}, set(), {"c-bob"})
    assert (ann.name, ann.connections, ann.seconds, ann.applied, ann.deltas) == (
        "ann",
        1,
        9.0,
        1,
        5,
    )
    assert (plain.connections, plain.applied, plain.deltas, plain.refused) == (1, 1, -2, 1)
    assert (bob.connections, bob.adds, bob.lagged) == (1, 0, 1)
    assert summary.refusals == {"bad_number": [1, "five"]}
    assert {code: entry[0] for code, entry in summary.close_codes.items()} == {
        1000: 1,
        1006: 1,
        1001: 1,
    }
    assert [c[0] for c in summary.commits] == [1.5]  # the debug commit, not the stats max
    assert [t[0] for t in summary.talkers] == [9, 3, 2]
    assert (summary.lag_episodes, summary.failures, summary.starts) == (1, 1, 1)
    assert summary.open_conns == {}
    assert (summary.first, summary.last) == (ts(0), ts(14))


def test_a_name_is_one_client_whatever_ids_it_came_with() -> None:
    # wstally client --name ann makes a new client id at every run: one row, not three.
    summary = Summary()
    for n in range(3):
        ctx = {"conn": f"conn{n}", "client": f"id{n}", "name": "ann"}
        summary.add({"event": "conn.closed", "level": "info", **ctx, "applied": 1})
    summary.add({"event": "conn.closed", "level": "info", "conn": "x", "client": "ann"})
    summary.add({"event": "conn.closed", "level": "info", "name": "(plain) h", "client": "i"})
    summary.add({"event": "conn.closed", "level": "info", "mode": "plain", "peer": "h:1"})
    assert set(summary.clients) == {
        ("name", "ann"),
        ("id", "ann"),  # a bare client id that happens to read "ann" is someone else
        ("name", "(plain) h"),
        ("host", "(plain) h"),
    }
    ann = summary.clients["name", "ann"]
    assert (ann.connections, ann.adds, ann.ids) == (3, 3, {"id0", "id1", "id2"})


def test_top_keeps_only_the_largest() -> None:
    summary = summarized(LINES, top=2)
    assert [t[0] for t in summary.talkers] == [9, 3]
    assert summary.talkers[0][1:5] == ("bbbb00000002", "c-bob", None, "10.0.0.2:6000")


def test_close_reasons_are_counted_by_code() -> None:
    summary = summarized(LINES)
    assert summary.close_codes[1001] == [1, {"going": 1}]
    assert summary.close_codes[1000] == [1, {}]  # an empty reason is no reason


def test_time_span_out_of_order() -> None:
    summary = Summary()
    for at in (5, 9, 1, 7):
        summary.add({"event": "e", "level": "info", "timestamp": ts(at)})
    assert (summary.first, summary.last) == (ts(1), ts(9))
