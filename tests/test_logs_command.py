"""``wstally logs`` as a command: sources, --json, exit statuses, and no input that crashes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pexpect
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import within
from logcases import LINES, logs, picked
from logfiles import generate
from wstally.logs import report
from wstally.logs.filters import Filter
from wstally.logs.render import format_event
from wstally.logs.scan import Counts
from wstally.logs.summary import Summary

if TYPE_CHECKING:
    Term = pexpect.spawn[str]
else:
    Term = pexpect.spawn


pytestmark = pytest.mark.usefixtures("restore_logging")


def test_json_passes_matching_lines_through_unchanged(
    monkeypatch: pytest.MonkeyPatch, logfile: Path
) -> None:
    result = logs(monkeypatch, "--json", str(logfile))
    assert result.code == 0
    assert result.lines == LINES
    # Malformed lines are counted and reported, not fatal; the blank line is no error.
    assert "skipped 4 malformed line(s) (first at " in result.err
    assert f"{logfile}:7)" in result.err


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


def test_summary_does_not_follow(monkeypatch: pytest.MonkeyPatch, logfile: Path) -> None:
    result = logs(monkeypatch, "--summary", "--follow", str(logfile))
    assert result.code == 2
    assert "cannot --follow" in result.err


def test_stdin_cannot_be_followed_with_files(
    monkeypatch: pytest.MonkeyPatch, logfile: Path
) -> None:
    result = logs(monkeypatch, "--follow", "-", str(logfile))
    assert result.code == 2
    assert "'-' (stdin) cannot be followed" in result.err


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


def test_nothing_matched_is_said_on_stderr_with_exit_0(logfile: Path) -> None:
    for args in (["--event", "nosuch"], ["--json", "--event", "nosuch"]):
        result = run_cli(*args, str(logfile))
        assert (result.returncode, result.stdout) == (0, b"")
        err = result.stderr.decode()
        assert f"no event matched ({len(LINES) + 5} line(s) read)" in err, err
        assert "wstally logs --summary FILE counts the events" in err
    found = run_cli("--event", "conn.hello", str(logfile))
    assert (found.returncode, b"conn.hello" in found.stdout) == (0, True)
    assert b"no event matched" not in found.stderr


def test_help_stands_on_its_own() -> None:
    # An installed package has no docs/: the help names the events worth a filter itself.
    result = subprocess.run(
        [sys.executable, "-m", "wstally", "logs", "--help"],
        capture_output=True,
        text=True,
        timeout=within(20),
        env={**os.environ, "COLUMNS": "100"},
    )
    assert result.returncode == 0
    assert "docs/" not in result.stdout
    for name in ("conn.closed", "update.refused", "server.stats", "update.applied"):
        assert f"\n  {name}" in result.stdout, name
    assert "--summary FILE counts every event a log holds" in result.stdout


# On a terminal


def terminal(*args: str) -> Term:
    return pexpect.spawn(
        sys.executable,
        ["-m", "wstally", "logs", *args],
        env={**os.environ, "TERM": "xterm-256color"},
        dimensions=(30, 120),
        timeout=within(10),
        encoding="utf-8",
        codec_errors="replace",
    )


def test_no_file_on_a_terminal_is_a_usage_error_not_a_silent_wait() -> None:
    term = terminal("--event", "conn.*")
    try:
        term.expect(r"usage: wstally logs \[FILE \.\.\.\]")
        term.expect("no FILE, and standard input is a terminal")
        term.expect(pexpect.EOF)
    finally:
        term.close()
    assert term.exitstatus == 2


def test_dash_reads_the_terminal_when_asked() -> None:
    term = terminal("-")
    try:
        term.sendline(LINES[3].rstrip("\n"))
        # Shown rendered (the time to the millisecond), not only echoed as typed.
        term.expect(r"10:00:02\.000Z")
        term.sendeof()
        term.expect(pexpect.EOF)
    finally:
        term.close()
    assert term.exitstatus == 0


# Any input


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
    summary = Summary()
    summary.add(event)
    report.tables(summary, Counts(lines=1, matched=1))
    format_event(event, color=True)
    flt = Filter(events=["conn.*"], level=20, client="c", conn="a", since="2026", until="2027")
    matcher = flt.matcher()
    assert matcher is not None
    matcher(event)
