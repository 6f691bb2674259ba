"""The ``wstally`` command as users run it: a real process, real signals, real files."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from helpers import within
from wstally.protocol import SUBPROTOCOL


@contextlib.contextmanager
def json_client(url: str, client: str = "c") -> Iterator[ClientConnection]:
    with connect(url, subprotocols=[SUBPROTOCOL], open_timeout=within(5)) as ws:
        snapshot = json.loads(ws.recv(timeout=within(5)))
        assert snapshot["type"] == "snapshot"
        ws.send(json.dumps({"type": "hello", "client": client}))
        yield ws


def test_sigterm_drains_pending_adds_then_closes_with_1001(serve: Any, tmp_path: Path) -> None:
    server = serve("--port", "0", "--db", str(tmp_path / "t.db"))
    count = 300
    acked: dict[str, int] = {}
    refused: set[str] = set()
    with json_client(server.url) as ws, pytest.raises(ConnectionClosed) as closed:
        # Many adds in flight, then SIGTERM at once: every one must be answered, and every
        # acked one must be durable.
        for i in range(count):
            ws.send(json.dumps({"type": "add", "delta": i + 1, "id": f"a{i}"}))
        os.kill(server.proc.pid, signal.SIGTERM)
        while True:
            frame = json.loads(ws.recv(timeout=within(10)))
            if frame["type"] == "ack":
                acked[frame["id"]] = frame["total"]
            elif frame["type"] == "error":
                assert frame["code"] == "shutting_down"
                refused.add(frame["id"])
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001
    assert len(acked) + len(refused) == count
    assert server.wait() == 0
    stopped = server.event("server.stopped")
    expected = sum(int(i[1:]) + 1 for i in acked)
    assert stopped["total"] == expected

    again = serve("--port", "0", "--db", str(tmp_path / "t.db"))
    health = again.health()
    assert health["total"] == expected
    assert health["seq"] == len(acked)
    assert again.stop(signal.SIGINT) == 0


def test_port_in_use_is_a_clear_error(serve: Any, tmp_path: Path) -> None:
    first = serve("--port", "0", "--memory")
    result = run_serve(tmp_path, "--memory", "--port", str(first.port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{first.port}: address already in use" in result.stderr
    assert first.stop() == 0


def run_serve(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``wstally serve`` expected to fail at start: its exit status and messages."""
    return subprocess.run(
        [sys.executable, "-m", "wstally", "serve", *args],
        capture_output=True,
        text=True,
        timeout=within(20),
        cwd=cwd,
    )


def test_unopenable_database_is_a_clear_error(tmp_path: Path) -> None:
    result = run_serve(tmp_path, "--port", "0", "--db", "/nonexistent/x.db")
    assert result.returncode == 1
    assert "cannot open database /nonexistent/x.db" in result.stderr


def test_database_in_use_by_another_server_is_refused(serve: Any, tmp_path: Path) -> None:
    first = serve("--port", "0", "--db", "shared.db")
    assert first.port
    result = run_serve(tmp_path, "--port", "0", "--db", "shared.db")
    assert result.returncode == 1
    assert "in use by another wstally server" in result.stderr
    assert first.stop() == 0


def test_default_database_is_created_in_the_working_directory(serve: Any, tmp_path: Path) -> None:
    server = serve("--port", "0")
    with connect(server.url) as plain:
        plain.send("5")
        assert plain.recv(timeout=within(5), decode=True) == "Server records total=5"
    assert server.stop() == 0
    assert (tmp_path / "wstally.db").exists()


def test_the_websockets_command_line_client_works_in_plain_mode(serve: Any) -> None:
    server = serve("--port", "0", "--memory")
    cli = subprocess.Popen(
        [sys.executable, "-m", "websockets", server.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert cli.stdin is not None
    assert cli.stdout is not None
    lines: queue.Queue[str] = queue.Queue()

    def pump(stream: IO[str]) -> None:
        for line in stream:
            lines.put(line)

    reader = threading.Thread(target=pump, args=(cli.stdout,), daemon=True)
    reader.start()

    def cli_sees(text: str) -> None:
        while text not in lines.get(timeout=within(10)):
            pass

    try:
        with connect(server.url) as plain:
            cli.stdin.write("5\n")
            cli.stdin.flush()
            # Its update reaches other plain clients, and theirs reach it.
            assert plain.recv(timeout=within(5), decode=True) == "Server records total=5"
            cli_sees("< Server records total=5")
            plain.send("-2")
            assert plain.recv(timeout=within(5), decode=True) == "Server records total=3"
            cli_sees("< Server records total=3")
        cli.stdin.close()
    finally:
        cli.kill()
        cli.wait()
        reader.join(within(5))
        cli.stdout.close()
    assert server.stop() == 0


def test_logs_go_through_one_json_chain(serve: Any) -> None:
    server = serve("--port", "0", "--memory")
    with connect(server.url) as plain:
        plain.send("oops")
        assert plain.recv(timeout=within(5), decode=True).startswith("error: ")
    assert server.stop() == 0
    for name in (
        "server.started",
        "conn.opened",
        "update.refused",
        "conn.closed",
        "server.stopped",
    ):
        event = server.event(name)
        assert event["level"] == "info"
        assert event["timestamp"].endswith("Z")
    closed = server.event("conn.closed")
    assert closed["mode"] == "plain"
    assert closed["refused"] == 1
    assert server.event("update.refused")["code"] == "bad_number"
    # websockets' own records are rendered by the same chain, level kept.
    assert any(e.get("logger") == "websockets.server" for e in server.events)
    assert all(line.startswith("{") for line in server.raw)


def test_version_and_module_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wstally", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("wstally ")
