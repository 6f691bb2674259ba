"""``wstally.logs.render``: one event as one readable line, escaped, colored on a terminal."""

from __future__ import annotations

from pathlib import Path

import pytest

from logcases import ANN, BOB, closed, logs
from logfiles import ts
from wstally.logs.render import format_event, short_ts

pytestmark = pytest.mark.usefixtures("restore_logging")


def test_readable_lines_without_colors_when_piped(
    monkeypatch: pytest.MonkeyPatch, logfile: Path
) -> None:
    result = logs(monkeypatch, "--event", "conn.closed", "--client", "c-ann", str(logfile))
    (text,) = result.out.decode().splitlines()
    assert "\x1b" not in text
    assert text.startswith("2026-11-24 10:00:10.000Z info     conn.closed")
    # The connection first, then the event's own fields.
    assert "conn=aaaa00000001 client=c-ann name=ann peer=10.0.0.1:5000 mode=json" in text
    assert 'duration=9.0 code=1000 reason=""' in text


def test_readable_output_escapes_what_peers_sent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hostile = closed(0, {**ANN, "client": "\x1b]0;pwned\x07", "name": "\u202eevil"})
    path = tmp_path / "hostile.log"
    path.write_text(hostile)
    for args in ([], ["--summary"]):
        out = logs(monkeypatch, *args, str(path)).out.decode()
        assert "\x1b" not in out
        assert "\x07" not in out
        assert "\u202e" not in out
        assert "pwned" in out


def test_colors_on_a_terminal() -> None:
    event = {"timestamp": ts(1), "level": "warning", "event": "broadcast.lagging", **BOB}
    colored = format_event(event, color=True)
    assert "\x1b[33mwarning" in colored
    assert "broadcast.lagging" in colored
    assert format_event(event, color=False).split() == [
        "2026-11-24",
        "10:00:01.000Z",
        "warning",
        "broadcast.lagging",
        "conn=bbbb00000002",
        "client=c-bob",
        "peer=10.0.0.2:6000",
        "mode=json",
    ]


def test_values_are_quoted_when_they_need_it() -> None:
    event = {"event": "e", "level": "info", "a": "plain", "b": 'say "hi"', "c": [1, None], "d": ""}
    assert format_event(event, color=False).endswith('a=plain b="say \\"hi\\"" c=[1,null] d=""')


def test_a_foreign_logger_is_named() -> None:
    event = {"event": "connection open", "level": "info", "logger": "websockets.server"}
    assert "logger=websockets.server" in format_event(event, color=False)
    assert "logger" not in format_event({**event, "logger": "wstally.server"}, color=False)


def test_exceptions_are_shown_under_their_line() -> None:
    event = {
        "timestamp": ts(1),
        "level": "critical",
        "event": "committer.error",
        "exception": [
            {
                "exc_type": "RuntimeError",
                "exc_value": "boom",
                "frames": [{"filename": "committer.py", "lineno": 9, "name": "_round"}],
            }
        ],
    }
    text = format_event(event, color=False)
    assert text.splitlines()[1:] == [
        "    at committer.py:9 in _round",
        "    RuntimeError: boom",
    ]
    plain = format_event({**event, "exception": "Traceback\n  \x1b[2J"}, color=False)
    assert plain.splitlines()[1:] == ["    Traceback", "      \\x1b[2J"]


def test_short_ts() -> None:
    assert short_ts(ts(1.5)) == "2026-11-24 10:00:01.500Z"
    assert short_ts("late\x1b") == "late\\x1b"
    assert short_ts(None) == "-"
