"""``wstally.logs.report``: the --summary figures as tables, through the command."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from logcases import LINES, logs, restored_logging, write_logfile
from logfiles import generate
from wstally.logs import report
from wstally.logs.scan import Counts
from wstally.logs.summary import Summary


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield from restored_logging()


@pytest.fixture
def logfile(tmp_path: Path) -> Path:
    return write_logfile(tmp_path)


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
