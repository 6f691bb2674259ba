"""``wstally logs``: filters, output, summary and --follow, on generated log files."""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import within
from logfiles import generate, line, ts
from wstally import cli, logsetup, logview

ANN = {"conn": "aaaa00000001", "peer": "10.0.0.1:5000", "mode": "json"}
ANN_HELLO = {**ANN, "client": "c-ann", "name": "ann"}
BOB = {"conn": "bbbb00000002", "peer": "10.0.0.2:6000", "mode": "json", "client": "c-bob"}
PLAIN = {"conn": "cccc00000003", "peer": "10.0.0.3:7000", "mode": "plain"}


def closed(at: float, ctx: dict[str, Any], **figures: Any) -> str:
    base = {
        "duration": 1.0,
        "code": 1000,
        "reason": "",
        "messages_in": 0,
        "bytes_in": 0,
        "frames_out": 0,
        "bytes_out": 0,
        "applied": 0,
        "duplicates": 0,
        "refused": 0,
        "lagged": 0,
        "clients": 0,
    }
    return line(at, "info", "conn.closed", **ctx, **{**base, **figures})


LINES = [
    line(0, "info", "server.started", port=8765, seq=0),
    line(1, "info", "connection open", "websockets.server", **ANN),
    line(1, "info", "conn.opened", **ANN, clients=1),
    line(2, "info", "conn.hello", **ANN_HELLO, since=None),
    line(3, "debug", "update.applied", **ANN_HELLO, seq=1, delta=5, total=5, id="a1"),
    line(4, "info", "conn.opened", **PLAIN, clients=2),
    line(5, "debug", "update.applied", **PLAIN, seq=2, delta=-2, total=3, id=None),
    line(6, "info", "update.refused", **PLAIN, code="bad_number", id=None, input="five"),
    line(7, "info", "conn.opened", **{k: v for k, v in BOB.items() if k != "client"}),
    line(8, "warning", "broadcast.lagging", **BOB, buffered=300_000, limit=262_144, lagged=1),
    line(9, "debug", "store.committed", "wstally.committer", batch=2, ms=1.5, first_seq=1),
    closed(10, ANN_HELLO, duration=9.0, messages_in=3, applied=1, refused=0),
    closed(11, PLAIN, duration=7.0, code=1006, messages_in=2, applied=1, refused=1),
    line(12, "critical", "store.commit_failed", "wstally.committer", error="disk full"),
    line(13, "info", "server.stats", "wstally.stats", commit_max_ms=12.5, batch_max=3),
    closed(14, BOB, duration=6.5, code=1001, reason="going", messages_in=9, lagged=1),
]
MALFORMED = [b"not json at all\n", b"\xff\xfe\n", b"[1, 2]\n", b'{"truncated": \n']


@pytest.fixture
def logfile(tmp_path: Path) -> Path:
    path = tmp_path / "server.log"
    data = b"".join(text.encode() for text in LINES[:6])
    data += MALFORMED[0] + b"\n"  # and a blank line, which is no error
    data += b"".join(text.encode() for text in LINES[6:12])
    data += b"".join(MALFORMED[1:])
    data += b"".join(text.encode() for text in LINES[12:])
    path.write_bytes(data)
    return path


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    logsetup.configure("json", os.environ.get("WSTALLY_TEST_LOG_LEVEL", "warning"))


class Result:
    def __init__(self, code: int, out: bytes, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def lines(self) -> list[str]:
        return self.out.decode().splitlines(keepends=True)


def logs(monkeypatch: pytest.MonkeyPatch, *argv: str, stdin: bytes = b"") -> Result:
    """``wstally logs ARGV`` through the real command line, in this process."""
    out, err = io.BytesIO(), io.StringIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = cli.main(["logs", *argv])
    stdout.flush()
    result = Result(code, out.getvalue(), err.getvalue())
    stdout.detach()
    return result


def picked(*indexes: int) -> list[str]:
    return [LINES[i] for i in indexes]


# Filters and --json


def test_json_passes_matching_lines_through_unchanged(
    monkeypatch: pytest.MonkeyPatch, logfile: Path
) -> None:
    result = logs(monkeypatch, "--json", str(logfile))
    assert result.code == 0
    assert result.lines == LINES
    # Malformed lines are counted and reported, not fatal; the blank line is no error.
    assert "skipped 4 malformed line(s) (first at " in result.err
    assert f"{logfile}:7)" in result.err


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


def test_relative_times(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    now = datetime.now(UTC)

    def at(ago: timedelta) -> str:
        stamp = (now - ago).isoformat().replace("+00:00", "Z")
        return f'{{"timestamp": "{stamp}", "level": "info", "event": "e{ago.seconds}"}}\n'

    old, recent = at(timedelta(hours=2)), at(timedelta(minutes=5))
    path = tmp_path / "recent.log"
    path.write_text(old + recent)
    assert logs(monkeypatch, "--json", "--since", "10m", str(path)).lines == [recent]
    assert logs(monkeypatch, "--json", "--since", "1h30m", str(path)).lines == [recent]
    assert logs(monkeypatch, "--json", "--until", "1h", str(path)).lines == [old]
    assert logs(monkeypatch, "--json", "--since", "3h", str(path)).lines == [old, recent]


def test_parse_time() -> None:
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    assert logview.parse_time("10m", now) == "2026-11-24T11:50:00.000000Z"
    assert logview.parse_time("1d2h", now) == "2026-11-23T10:00:00.000000Z"
    assert logview.parse_time("2026-11-24T10:00Z", now) == "2026-11-24T10:00:00.000000Z"
    assert logview.parse_time("2026-11-24T11:00+01:00", now) == "2026-11-24T10:00:00.000000Z"
    with pytest.raises(logview.LogsError, match="not a time"):
        logview.parse_time("yesterday", now)


def test_a_timestamp_without_microseconds_compares_right(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # isoformat() leaves ".000000" out: string order alone would put it after ".5".
    whole = '{"timestamp": "2026-11-24T10:00:01Z", "level": "info", "event": "whole"}\n'
    path = tmp_path / "whole.log"
    path.write_text(whole)
    assert logs(monkeypatch, "--json", "--since", "2026-11-24T10:00:00.5Z", str(path)).lines == [
        whole
    ]
    assert logs(monkeypatch, "--json", "--until", "2026-11-24T10:00:00.5Z", str(path)).lines == []


def test_reads_stdin_when_no_file_or_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    data = "".join(LINES).encode()
    assert logs(monkeypatch, "--json", "--event", "conn.hello", stdin=data).lines == picked(3)
    assert logs(monkeypatch, "--json", "-", "--level", "critical", stdin=data).lines == picked(13)


def test_several_files_and_an_unreadable_one(
    monkeypatch: pytest.MonkeyPatch, logfile: Path, tmp_path: Path
) -> None:
    result = logs(
        monkeypatch, "--json", "--event", "server.started", str(tmp_path / "nope"), str(logfile)
    )
    assert result.code == 2
    assert "cannot read" in result.err
    assert result.lines == picked(0)


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


# Readable output


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


def test_colors_on_a_terminal(logfile: Path) -> None:
    event = {"timestamp": ts(1), "level": "warning", "event": "broadcast.lagging", **BOB}
    colored = logview.format_event(event, color=True)
    assert "\x1b[33mwarning" in colored
    assert "broadcast.lagging" in colored
    assert logview.format_event(event, color=False).split() == [
        "2026-11-24",
        "10:00:01.000Z",
        "warning",
        "broadcast.lagging",
        "conn=bbbb00000002",
        "client=c-bob",
        "peer=10.0.0.2:6000",
        "mode=json",
    ]


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
    text = logview.format_event(event, color=False)
    assert text.splitlines()[1:] == [
        "    at committer.py:9 in _round",
        "    RuntimeError: boom",
    ]


# Summary


def test_summary_figures(logfile: Path) -> None:
    summary = logview.Summary()
    for text in LINES:
        summary.add(json.loads(text))
    assert summary.events[("conn.closed", "info")] == 3
    assert summary.events[("update.applied", "debug")] == 2
    ann, plain, bob = (summary.clients[k] for k in ("c-ann", "(plain) 10.0.0.3", "c-bob"))
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


def test_summary_table(monkeypatch: pytest.MonkeyPatch, logfile: Path) -> None:
    result = logs(monkeypatch, "--summary", str(logfile))
    assert result.code == 0
    text = result.out.decode()
    assert "\x1b" not in text  # no colors when piped
    for expected in (
        "lines read",
        "malformed lines",
        "c-ann",
        "(plain) 10.0.0.3",
        "adds and Σ delta from update.applied (debug)",
        "bad_number",
        "abnormal (no close frame)",
        "going",
        "Slowest commits",
        "Top talkers",
        "bbbb00000002",
    ):
        assert expected in text, expected
    assert "skipped 4 malformed line(s)" in result.err


def test_summary_without_debug_events_takes_adds_from_conn_closed(
    monkeypatch: pytest.MonkeyPatch, logfile: Path
) -> None:
    result = logs(monkeypatch, "--summary", "--level", "info", str(logfile))
    text = result.out.decode()
    assert "adds from conn.closed applied counts" in text
    assert "server.stats (interval max)" in text  # no per-commit events at info


def test_summary_of_a_generated_log(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    with path.open("w") as out:
        count = generate(out, 300_000)
    result = logs(monkeypatch, "--summary", str(path))
    assert result.code == 0
    assert f"{count:,}" in result.out.decode()
    assert "malformed line(s)" in result.err


# --follow


class Follower:
    """``wstally logs --follow`` as a process, its output lines collected on a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wstally", "logs", "--follow", "--poll-interval", "0.02", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw)

    def next(self) -> bytes:
        return self.lines.get(timeout=within(10))

    def nothing_for(self, seconds: float) -> bool:
        try:
            self.lines.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=within(10))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(within(5))
            assert self.proc.stdout is not None
            assert self.proc.stderr is not None
            err = self.proc.stderr.read().decode()
            self.proc.stdout.close()
            self.proc.stderr.close()
        return code, err


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as file:
        file.write(data)


def test_follow_survives_partial_lines_rotation_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    path.write_bytes((LINES[0] + LINES[1]).encode())
    follower = Follower("--json", "--since", "2000-01-01", str(path))
    try:
        # --since: from the beginning.
        assert [follower.next(), follower.next()] == [LINES[0].encode(), LINES[1].encode()]
        append(path, LINES[2].encode())
        assert follower.next() == LINES[2].encode()
        # Half a line is held back until its end is written.
        half = len(LINES[3]) // 2
        append(path, LINES[3][:half].encode())
        assert follower.nothing_for(0.2)
        append(path, LINES[3][half:].encode() + b"garbage\n")
        assert follower.next() == LINES[3].encode()
        # Rotation: the old file is read to its end (a late line), then the new one.
        path.rename(tmp_path / "server.log.1")
        append(tmp_path / "server.log.1", LINES[4].encode())
        path.write_bytes(LINES[5].encode())
        assert [follower.next(), follower.next()] == [LINES[4].encode(), LINES[5].encode()]
        # Truncation in place (copytruncate), then a shorter line: read from the start.
        path.write_bytes(b"")
        time.sleep(0.1)
        path.write_bytes(LINES[0].encode())
        assert follower.next() == LINES[0].encode()
        # A file that disappears and comes back.
        path.unlink()
        time.sleep(0.1)
        path.write_bytes(LINES[6].encode())
        assert follower.next() == LINES[6].encode()
    finally:
        code, err = follower.stop()
    assert code == 130
    assert "skipped 1 malformed line(s)" in err


def test_follow_starts_at_the_end_and_filters(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    path.write_bytes(LINES[11].encode())  # an old conn.closed: not shown
    follower = Follower("--json", "--event", "conn.closed", str(path))
    try:
        # Keep appending until the follower, once at the end, shows one.
        new = closed(20, BOB, code=4000).encode()
        deadline = time.monotonic() + within(10)
        got = None
        while got is None and time.monotonic() < deadline:
            append(path, LINES[0].encode() + new)
            with contextlib.suppress(queue.Empty):
                got = follower.lines.get(timeout=0.1)
        assert got == new
    finally:
        follower.stop()


# The process end to end


def run_cli(*args: str, stdin: IO[bytes] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "wstally", "logs", *args],
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=within(30),
    )


def test_end_to_end_and_a_reader_that_goes_away(tmp_path: Path, logfile: Path) -> None:
    result = run_cli("--json", "--event", "conn.opened", str(logfile))
    assert result.returncode == 0
    assert result.stdout.decode() == "".join(picked(2, 5, 8))
    big = tmp_path / "big.log"
    with big.open("w") as out:
        generate(out, 2_000_000)
    # | head -1: the pipe closes early; no traceback, exit 0.
    proc = subprocess.Popen(
        [sys.executable, "-m", "wstally", "logs", str(big)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    assert proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=within(30)) == 0
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert "Traceback" not in err


def test_odd_values_never_crash_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    odd = [
        '{"event": ["a"], "level": {"x": 1}, "timestamp": 5}\n',
        '{"event": "conn.closed", "level": "info", "code": [1000], "reason": {"r": 1},'
        ' "duration": NaN, "applied": "many", "messages_in": 1e400, "conn": 7}\n',
        '{"event": "update.applied", "level": "debug", "delta": "5", "client": ["c"]}\n',
        '{"event": "server.stats", "level": "info", "commit_max_ms": "slow"}\n',
        '{"event": "store.committed", "level": "debug", "ms": Infinity, "batch": null}\n',
        '{"event": "update.refused", "level": "info", "code": {"c": 1}, "input": [1]}\n',
        '{"event": "committer.error", "level": "critical", "exception": [1, {"frames": 3}]}\n',
    ]
    path = tmp_path / "odd.log"
    path.write_text("".join(odd))
    for args in (
        [],
        ["--summary"],
        ["--json", "--where", "code>3", "--level", "info"],
        ["--since", "1h", "--event", "conn.*", "--client", "c"],
    ):
        result = logs(monkeypatch, *args, str(path))
        assert result.code == 0, (args, result.err)
    assert len(logs(monkeypatch, str(path)).out.decode().splitlines()) >= len(odd)


def test_summary_does_not_follow(monkeypatch: pytest.MonkeyPatch, logfile: Path) -> None:
    result = logs(monkeypatch, "--summary", "--follow", str(logfile))
    assert result.code == 2
    assert "cannot --follow" in result.err


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
KEYS = st.sampled_from(
    [
        "event",
        "level",
        "timestamp",
        "conn",
        "client",
        "name",
        "peer",
        "mode",
        "code",
        "reason",
        "duration",
        "applied",
        "refused",
        "lagged",
        "messages_in",
        "delta",
        "ms",
        "batch",
        "commit_max_ms",
        "batch_max",
        "input",
        "exception",
        "logger",
    ]
)
EVENTS = st.sampled_from(
    [
        "conn.opened",
        "conn.closed",
        "update.applied",
        "update.refused",
        "server.stats",
        "server.started",
        "store.committed",
        "store.commit_slow",
        "store.commit_failed",
        "broadcast.lagging",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, JSON, max_size=8), EVENTS | JSON)
def test_any_json_object_is_summarized_and_shown(event: dict[str, Any], name: Any) -> None:
    event["event"] = name
    summary = logview.Summary()
    summary.add(event)
    summary.tables(logview.Counts(lines=1, matched=1))
    logview.format_event(event, color=True)
    flt = logview.Filter(
        events=["conn.*"], level=20, client="c", conn="a", since="2026", until="2027"
    )
    matcher = flt.matcher()
    assert matcher is not None
    matcher(event)
