"""scripts/loadtest.py end to end, with small numbers: its verdict must be honest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
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


def test_compare_naive_works_from_an_installed_package(tmp_path: Path) -> None:
    # The package copied away from the source checkout, as pip would install it: the naive
    # reference server must come with it, not from benchmarks/ in a clone.
    site = tmp_path / "site"
    shutil.copytree(
        ROOT / "src" / "wstally", site / "wstally", ignore=shutil.ignore_patterns("__pycache__")
    )
    script = tmp_path / "loadtest.py"
    shutil.copy(SCRIPT, script)
    out = tmp_path / "compare.json"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--quiet",
            "--compare",
            "naive",
            "--store",
            "memory",
            "--watchers",
            "3",
            "--senders",
            "1",
            "--updates",
            "100",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=within(120),
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output
    report = json.loads(out.read_text())
    assert report["runs"]["naive"]["pass"] is True
    assert report["runs"]["naive"]["acked"] == 100


def test_no_server_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once it is closed
    code, _, output = loadtest(tmp_path, "--url", f"ws://127.0.0.1:{port}/", "--duration", "1")
    assert code == 2
    assert output.strip() == f"no server at ws://127.0.0.1:{port}/; start one or use --spawn"
    # The default URL, as the README's first command would meet it with no server running.
    code, _, output = loadtest(tmp_path, "--duration", "1")
    if code == 2:  # (unless someone's server does listen on 8765 on this machine)
        assert output.strip() == "no server at ws://127.0.0.1:8765/; start one or use --spawn"


def test_rate_limited_senders_pace_themselves_and_resend(tmp_path: Path) -> None:
    code, figures, output = loadtest(
        tmp_path,
        "--spawn",
        "--server-cmd",
        f"{sys.executable} -m wstally serve --memory --rate-limit 400",
        "--watchers",
        "3",
        "--senders",
        "2",
        "--window",
        "400",
        "--updates",
        "2000",
    )
    assert code == 0, output
    assert figures["rate_limited"] > 0, "the limit was never met"
    assert figures["refused"] == {}
    assert figures["acked"] == figures["sent"] == 2000
    assert figures["final"]["seq"] - figures["start"]["seq"] == 2000


def test_ctrl_c_ends_a_run_with_130_and_no_traceback(tmp_path: Path) -> None:
    run = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--spawn",
            "--store",
            "memory",
            "--watchers",
            "5",
            "--senders",
            "1",
            "--rate",
            "100",
            "--duration",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        time.sleep(within(4))  # spawned server up, workers connected, adds flowing
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C does: the whole group
        output, _ = run.communicate(timeout=within(30))
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
    assert run.returncode == 130, output
    assert "interrupted: no verdict" in output
    assert "Traceback" not in output
