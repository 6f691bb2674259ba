"""scripts/loadtest.py end to end, with small numbers: its verdict must be honest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import within

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "loadtest.py"
NAIVE = f"{sys.executable} -m wstally.loadgen.naive_server"


def loadtest(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quiet", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=within(120),
        cwd=ROOT,
    )
    figures = json.loads(out.read_text()) if out.exists() else {}
    return result.returncode, figures, result.stdout + result.stderr


def test_passes_against_wstally_with_sqlite(tmp_path: Path) -> None:
    code, figures, output = loadtest(
        tmp_path, "--spawn", "--watchers", "20", "--senders", "3", "--updates", "600"
    )
    assert code == 0, output
    assert figures["pass"] is True
    assert "PASS" in output
    assert figures["acked"] == figures["sent"] == 600
    assert figures["final"]["seq"] - figures["start"]["seq"] == 600
    # Every watcher received every update.
    assert figures["deliveries"] == 600 * 20
    assert figures["fanout_ms"]["count"] > 0
    assert figures["ack_ms"]["count"] == 600
    assert figures["server_cpu_seconds"] >= 0


def test_paced_senders_over_several_processes(tmp_path: Path) -> None:
    code, figures, output = loadtest(
        tmp_path,
        "--spawn",
        "--store",
        "memory",
        "--watchers",
        "10",
        "--senders",
        "2",
        "--rate",
        "200",
        "--duration",
        "1",
        "--processes",
        "2",
    )
    assert code == 0, output
    assert 200 <= figures["acked"] <= 2 * 200 * 1.5
    assert figures["connections"] == 12


@pytest.mark.parametrize("fault", ["drop", "double"])
def test_fails_against_a_broken_server(tmp_path: Path, fault: str) -> None:
    code, figures, output = loadtest(
        tmp_path,
        "--spawn",
        "--server-cmd",
        f"{NAIVE} --fault {fault}",
        "--watchers",
        "5",
        "--senders",
        "2",
        "--updates",
        "300",
    )
    assert code == 1, output
    assert figures["pass"] is False
    failed = [c["what"] for c in figures["checks"] if not c["ok"]]
    if fault == "drop":
        assert any("gaps" in what for what in failed), failed
    else:
        assert any("server total" in what for what in failed), failed


def test_refuses_a_non_loopback_target(tmp_path: Path) -> None:
    code, _, output = loadtest(tmp_path, "--url", "ws://192.0.2.1:8765/", "--duration", "1")
    assert code == 2
    assert "not a loopback address" in output


def test_find_capacity_steps_until_the_limit(tmp_path: Path) -> None:
    out = tmp_path / "capacity.json"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quiet",
            "--spawn",
            "--store",
            "memory",
            "--find-capacity",
            "--step",
            "10",
            "--max-watchers",
            "30",
            "--p99-limit",
            "5000",
            "--senders",
            "2",
            "--rate",
            "50",
            "--duration",
            "0.5",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=within(120),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    # A generous limit holds at every step: the search stops at --max-watchers.
    assert [s["watchers"] for s in report["steps"]] == [10, 20, 30]
    assert report["capacity"] == 30
    assert "largest audience that held" in result.stdout
