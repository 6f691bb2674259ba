"""Crash safety: SIGKILL the server mid-load, restart it on the same database.

The load test's clients reconnect and resend every unanswered add with its id; its verdict
must still be PASS: the server's total is the sum of every add exactly once, every ack
survived, and every watcher ends on the server's seq.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import within
from servers import ServeProcess

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("kill_after", [0.2, 0.9, 1.6])
def test_sigkill_mid_run_loses_nothing_and_counts_nothing_twice(
    tmp_path: Path, kill_after: float
) -> None:
    port = str(free_port())
    db = str(tmp_path / "crash.db")
    servers = [ServeProcess(tmp_path, "--db", db, "--port", port)]
    out = tmp_path / "result.json"
    load = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "loadtest.py"),
            "--url",
            servers[0].url,
            "--reconnect",
            "--watchers",
            "10",
            "--senders",
            "3",
            "--duration",
            "2.5",
            "--quiet",
            "--json",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Wait for the adds to flow, then kill at the chosen moment.
        deadline = time.monotonic() + within(20)
        while servers[0].health()["seq"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(kill_after)
        killed_at = servers[0].health()["seq"]
        servers[0].proc.send_signal(signal.SIGKILL)
        servers[0].wait()
        time.sleep(0.3)
        servers.append(ServeProcess(tmp_path, "--db", db, "--port", port))
        output, _ = load.communicate(timeout=within(90))
    finally:
        if load.poll() is None:
            load.kill()
            load.communicate()
        for server in servers:
            server.close()
    assert load.returncode == 0, output
    report = json.loads(out.read_text())
    assert report["pass"] is True
    assert report["reconnects"] >= 13  # every connection came back
    assert report["final"]["seq"] == report["acked"] > killed_at
