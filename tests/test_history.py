"""``wstally history``: the stored updates, read-only, and ``--verify`` of their chain."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from helpers import OpenClient, ServerFactory, within
from wstally import cli, history
from wstally.store import SQLiteStore
from wstally.tally import INT64_MAX, Update

AT = 1795514400.25  # 2026-11-24T10:00:00.250Z


pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """Five updates by ann (JSON), bob and a plain connection, as the server stores them."""
    path = tmp_path / "odd name?#1.db"  # a URI needs quoting for this one
    store = SQLiteStore(path)
    store.load(window=10)
    total = 0
    rows = []
    for seq, (delta, client, name) in enumerate(
        [
            (5, "c-ann", "ann"),
            (-2, None, None),
            (10, "c-bob", "bob"),
            (7, "c-ann", "ann"),
            (1, None, None),
        ],
        1,
    ):
        total += delta
        req_id = f"r{seq}" if client else None
        conn = "plainconn000" if client is None else f"conn-{client}"
        rows.append(Update(seq, delta, total, AT + seq, conn, client, name, req_id))
    store.commit(rows)
    store.close()
    return path


def run(monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[int, str, str]:
    out, err = io.BytesIO(), io.StringIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", err)
    code = cli.main(["history", *argv])
    stdout.flush()
    text = out.getvalue().decode()
    stdout.detach()
    return code, text, err.getvalue()


def tamper(path: Path, sql: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(sql)
    conn.close()


def test_one_line_per_row_when_piped(monkeypatch: pytest.MonkeyPatch, db: Path) -> None:
    code, out, _ = run(monkeypatch, "--db", str(db))
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 5
    assert lines[0].split("\t") == [
        "1",
        "2026-11-24T10:00:01.250Z",
        "+5",
        "5",
        "c-ann",
        "ann",
        "conn-c-ann",
        "r1",
    ]
    assert lines[1].split("\t")[2:6] == ["-2", "3", "-", "-"]


def test_json_and_selections(monkeypatch: pytest.MonkeyPatch, db: Path) -> None:
    code, out, _ = run(monkeypatch, "--db", str(db), "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert rows[0] == {
        "seq": 1,
        "at": AT + 1,
        "conn": "conn-c-ann",
        "client": "c-ann",
        "name": "ann",
        "req_id": "r1",
        "delta": 5,
        "total": 5,
        "time": "2026-11-24T10:00:01.250Z",
    }

    def seqs(*args: str) -> list[int]:
        _, text, _ = run(monkeypatch, "--db", str(db), "--json", *args)
        return [json.loads(line)["seq"] for line in text.splitlines()]

    assert seqs("--since", "3") == [4, 5]
    assert seqs("--client", "c-ann") == [1, 4]
    assert seqs("--client", "bob") == [3]  # a display name works too
    assert seqs("--tail", "2") == [4, 5]
    assert seqs("--client", "c-ann", "--tail", "1") == [4]
    assert seqs("--since", "5") == []


def test_table_on_a_terminal(db: Path) -> None:
    out = io.StringIO()
    table = history._Table(out, color=False)
    store = SQLiteStore(db, readonly=True)
    try:
        for row in store.rows():
            table.row(row)
    finally:
        store.close()
    header, first, second, *_ = out.getvalue().splitlines()
    assert header.split() == ["seq", "time", "(UTC)", "delta", "total", "client", "name", "conn"]
    assert first.split() == [
        "1",
        "2026-11-24T10:00:01.250Z",
        "+5",
        "5",
        "c-ann",
        "ann",
        "conn-c-ann",
    ]
    # Columns line up: every delta ends where the header's does.
    assert first.index(" +5 ") + 3 == header.index("delta") + 5 == second.index(" -2 ") + 3


def test_the_command_labels_its_columns_on_a_terminal_only(db: Path) -> None:
    term = pexpect.spawn(
        sys.executable,
        ["-m", "wstally", "history", "--db", str(db)],
        env={**os.environ, "TERM": "xterm-256color", "NO_COLOR": "1"},
        dimensions=(30, 120),
        timeout=within(10),
        encoding="utf-8",
    )
    try:
        term.expect(pexpect.EOF)
    finally:
        term.close()
    assert term.exitstatus == 0
    assert isinstance(term.before, str)
    header, *rows = term.before.splitlines()
    assert header.split() == ["seq", "time", "(UTC)", "delta", "total", "client", "name", "conn"]
    assert [row.split()[0] for row in rows] == ["1", "2", "3", "4", "5"]
    # Piped: rows only, for cut and awk (the columns are named in --help).
    piped = subprocess.run(
        [sys.executable, "-m", "wstally", "history", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=within(20),
    )
    assert [line.split("\t")[0] for line in piped.stdout.splitlines()] == ["1", "2", "3", "4", "5"]
    help_text = subprocess.run(
        [sys.executable, "-m", "wstally", "history", "--help"],
        capture_output=True,
        text=True,
        timeout=within(20),
    ).stdout
    assert "seq, time, delta, total, client, name, conn, request id" in " ".join(help_text.split())


def test_verify_ok(monkeypatch: pytest.MonkeyPatch, db: Path) -> None:
    code, out, _ = run(monkeypatch, "--db", str(db), "--verify")
    assert code == 0
    assert out.startswith("OK: 5 updates, seq 1..5, total 21: ")
    assert len(out.splitlines()) == 1
    code, out, _ = run(monkeypatch, "--db", str(db), "--verify", "--since", "3")
    assert (code, out.split(",")[0]) == (0, "OK: 2 updates")


@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        (
            "UPDATE updates SET total = total + 1 WHERE seq = 3",
            "seq 3: total is 14, expected 13 (total 3 at seq 2 + delta 10)",
        ),
        (
            "UPDATE updates SET delta = 6 WHERE seq = 1",
            "seq 1: total is 5, expected 6 (total 0 at seq 0 + delta 6)",
        ),
        ("DELETE FROM updates WHERE seq = 4", "seq 5: expected seq 4 after 3"),
        ("DELETE FROM updates WHERE seq = 1", "seq 2: the history must start at seq 1"),
        ("UPDATE updates SET delta = 'ten' WHERE seq = 3", "seq 3: delta 'ten' is not a 64-bit"),
        (f"UPDATE updates SET total = {INT64_MAX + 1} WHERE seq = 2", "seq 2: total 9.22"),
    ],
)
def test_verify_finds_the_first_tampered_row(
    monkeypatch: pytest.MonkeyPatch, db: Path, sql: str, problem: str
) -> None:
    tamper(db, sql)
    code, out, _ = run(monkeypatch, "--db", str(db), "--verify")
    assert code == 1
    assert out.startswith(f"FAIL: {problem}"), out
    assert len(out.splitlines()) == 1


def test_verify_needs_the_whole_chain(monkeypatch: pytest.MonkeyPatch, db: Path) -> None:
    code, _, err = run(monkeypatch, "--db", str(db), "--verify", "--client", "c-ann")
    assert code == 2
    assert "--verify checks the whole chain" in err


def test_unreadable_databases(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code, _, err = run(monkeypatch, "--db", str(tmp_path / "missing.db"))
    assert (code, "no database at" in err) == (2, True)
    assert not (tmp_path / "missing.db").exists()  # read-only: nothing created
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    code, _, err = run(monkeypatch, "--db", str(empty), "--verify")
    assert code == 2
    assert "no such table" in err


async def test_reads_and_verifies_beside_a_running_server(
    make_server: ServerFactory, tmp_path: Path, open_client: OpenClient
) -> None:
    path = tmp_path / "live.db"
    server = await make_server(store=SQLiteStore(path))
    client = await open_client(server.url, {"client": "c-live", "name": "liv"})
    for i in range(20):
        assert (await client.add(i, f"l{i}"))["type"] == "ack"

    def history_cli(*args: str) -> subprocess.CompletedProcess[str]:
        # Another process, as an operator runs it: the server holds the lock and the WAL.
        return subprocess.run(
            [sys.executable, "-m", "wstally", "history", "--db", str(path), *args],
            capture_output=True,
            text=True,
            timeout=within(20),
        )

    verified = history_cli("--verify")
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("OK: 20 updates, seq 1..20, total 190")
    listed = history_cli("--json", "--tail", "1")
    assert json.loads(listed.stdout)["client"] == "c-live"
    # The server goes on writing while readers come and go.
    assert (await client.add(10, "after"))["total"] == 200
    assert history_cli("--verify").stdout.startswith("OK: 21 updates")
