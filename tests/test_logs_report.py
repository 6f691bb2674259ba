"""``wstally.logs.report``: the --summary figures as tables, through the command."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import within
from logcases import LINES, logs
from logfiles import generate
from servers import ServeProcess
from wstally.logs import report
from wstally.logs.scan import Counts
from wstally.logs.summary import Summary

pytestmark = pytest.mark.usefixtures("restore_logging")


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
    assert "adds from conn.closed; Σ delta needs a --log-level debug log" in text
    assert "Σ delta " not in text.replace("Σ delta needs", "")  # no column of dashes
    assert "server.stats (interval max)" in text  # no per-commit events at info


def test_summary_of_a_generated_log(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    with path.open("w") as out:
        count = generate(out, 300_000)
    result = logs(monkeypatch, "--summary", str(path))
    assert result.code == 0
    assert f"{count:,}" in result.out.decode()
    assert "malformed line(s)" in result.err


def test_one_table_per_question() -> None:
    summary = Summary()
    for text in LINES:
        summary.add(json.loads(text))
    titles = [str(table.title) for table in report.tables(summary, Counts(lines=16))]
    assert titles == [
        "wstally logs --summary",
        "Events",
        "Levels",
        "Clients",
        "Refusals by code",
        "Close codes",
        "Slowest commits",
        "Top talkers (messages in)",
    ]


def test_markup_in_a_name_is_shown_as_written() -> None:
    summary = Summary()
    summary.add({"event": "conn.closed", "level": "info", "client": "[bold]x[/bold]"})
    out = io.StringIO()
    report.render(summary, out, Counts(lines=1, matched=1), width=200)
    assert "[bold]x[/bold]" in out.getvalue()


# A real server's log, as a new user makes one


def wstally(*args: str, stdin: str = "") -> str:
    result = subprocess.run(
        [sys.executable, "-m", "wstally", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=within(30),
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def rows(text: str) -> list[list[str]]:
    """The body rows of every table (rich draws them between │)."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in text.splitlines()
        if line.startswith("│")
    ]


COUNT = re.compile(r"[+-]?\d{1,3}(,\d{3})*")


def test_summary_of_a_real_server_log(tmp_path: Path) -> None:
    # Three runs of `wstally client --name ann` (a new client id each), a thousand adds by bob.
    log = tmp_path / "server.log"
    debug_log = ("--log-level", "debug", "--log-file", str(log))
    server = ServeProcess(tmp_path, "--port", "0", "--memory", *debug_log)
    try:
        for _ in range(3):
            wstally("client", server.url, "--name", "ann", stdin="5\n")
        wstally("client", server.url, "--name", "bob", stdin="1\n" * 1000)
        assert server.stop() == 0
    finally:
        server.close()

    debug = rows(wstally("logs", "--summary", str(log)))
    [ann] = [r for r in debug if r[0] == "ann"]  # one row, not one per run
    assert ann[1:] == ["3 ids", "3", ann[3], "3", "+15", "0", "0"]
    [bob] = [r for r in debug if r[0] == "bob"]
    assert bob[2:] == ["1", bob[3], "1,000", "+1,000", "0", "0"]
    [talker] = [r for r in debug if len(r) > 2 and r[2] == "bob"]
    messages, applied, refused, bytes_in = talker[4:8]
    assert (messages, applied, refused) == ("1,001", "1,000", "0")  # the hello and 1,000 adds
    assert COUNT.fullmatch(bytes_in)
    assert "," in bytes_in

    info = wstally("logs", "--summary", "--level", "info", str(log))
    # Without debug events, the sum comes from conn.closed's delta_sum.
    assert "Σ delta from conn.closed" in info
    [ann] = [r for r in rows(info) if r[0] == "ann"]
    assert ann[1:] == ["3 ids", "3", ann[3], "3", "+15", "0", "0"]
    # Every count in the rows of a client or a connection alike (not close codes: 1000).
    for row in [r for r in rows(info) + debug if "ann" in r or "bob" in r]:
        for cell in row:
            # (Hex ids of 12 or 16 digits may happen to be all decimal digits.)
            if re.fullmatch(r"[+-]?[0-9,]+", cell) and len(cell) < 12:
                assert COUNT.fullmatch(cell), (cell, row)  # 1,000, never 1000
