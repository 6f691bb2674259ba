"""``wstally.logs.when``: the --since/--until bounds and the log's timestamps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from logcases import logs
from wstally.logs.errors import LogsError
from wstally.logs.when import normal_ts, parse_time

pytestmark = pytest.mark.usefixtures("restore_logging")


def test_parse_time() -> None:
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    assert parse_time("10m", now) == "2026-11-24T11:50:00.000000Z"
    assert parse_time("1d2h", now) == "2026-11-23T10:00:00.000000Z"
    assert parse_time("2026-11-24T10:00Z", now) == "2026-11-24T10:00:00.000000Z"
    assert parse_time("2026-11-24T11:00+01:00", now) == "2026-11-24T10:00:00.000000Z"
    with pytest.raises(LogsError, match="not a time"):
        parse_time("yesterday", now)


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-11-24T10:00:01.500000Z", "2026-11-24T10:00:01.500000Z"),
        ("2026-11-24T10:00:01Z", "2026-11-24T10:00:01.000000Z"),
        ("2026-11-24T11:00:01+01:00", "2026-11-24T10:00:01.000000Z"),
        ("2026-11-24T10:00:01", "2026-11-24T10:00:01.000000Z"),  # no zone: UTC
        ("yesterday", None),
        (5, None),
        (None, None),
    ],
)
def test_normal_ts(ts: object, expected: str | None) -> None:
    assert normal_ts(ts) == expected


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
