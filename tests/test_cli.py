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
import urllib.error
import urllib.request
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


def test_a_failed_start_leaves_no_database_and_a_stop_no_lock(serve: Any, tmp_path: Path) -> None:
    first = serve("--port", "0", "--db", "a.db")
    port = first.port  # started
    assert (tmp_path / "a.db.lock").exists()  # while it runs
    result = run_serve(tmp_path, "--db", "x.db", "--port", str(port))
    assert result.returncode == 1
    assert "address already in use" in result.stderr
    assert result.stderr.count("address already in use") == 1  # said once
    assert not list(tmp_path.glob("x.db*"))
    assert first.stop() == 0
    assert not (tmp_path / "a.db.lock").exists()
    assert (tmp_path / "a.db").exists()


def test_a_tls_error_names_the_file(tmp_path: Path) -> None:
    result = run_serve(tmp_path, "--port", "0", "--memory", "--certfile", "missing.pem")
    assert result.returncode == 1
    assert "missing.pem: No such file or directory" in result.stderr
    assert not list(tmp_path.glob("*.db*"))


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
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/nope", timeout=within(5))
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
    # websockets' own records are rendered by the same chain, as events of the catalog.
    response = next(e for e in server.events if e.get("logger") == "websockets.server")
    assert (response["event"], response["status"], response["level"]) == (
        "http.response",
        404,
        "info",
    )
    assert all(line.startswith("{") for line in server.raw)


def test_version_and_module_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wstally", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("wstally ")


def wstally(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Any ``wstally`` command, expected to end by itself."""
    return subprocess.run(
        [sys.executable, "-m", "wstally", *args],
        input="",
        capture_output=True,
        text=True,
        timeout=within(20),
        env={**os.environ, **(env or {})},
    )


INTEGER_0_65535 = "use an integer from 0 to 65535"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("serve", "--port", "99999"), f"--port: 99999 is out of range: {INTEGER_0_65535}"),
        (("serve", "--port", "-1"), f"--port: -1 is out of range: {INTEGER_0_65535}"),
        (("serve", "--buffer-limit", "-1"), "--buffer-limit: -1 is out of range: use an integer"),
        (("serve", "--max-connections", "0"), "--max-connections: 0 is out of range"),
        (("serve", "--rate-limit", "-5"), "--rate-limit: -5 is out of range: use a number of"),
        (("serve", "--flush-interval", "nan"), "--flush-interval: nan is out of range"),
        (("serve", "--slow-timeout", "abc"), "--slow-timeout: 'abc' is not a number of at least"),
        (("serve", "--stats-interval", "inf"), "--stats-interval: inf is out of range"),
        (("serve", "--ping-timeout", "-1"), "--ping-timeout: -1 is out of range"),
        (("client", "--timeout", "0"), "--timeout: 0 is out of range: use a number greater than"),
        (("watch", "--exit-after", "0"), "--exit-after: 0 is out of range: use an integer of at"),
        (("logs", "--top", "0"), "--top: 0 is out of range"),
        (("history", "--tail", "-3"), "--tail: -3 is out of range"),
        (("client", "--name", "x" * 33), "--name: a name is 1 to 32 printable characters"),
    ],
)
def test_out_of_range_numbers_are_usage_errors(args: tuple[str, ...], says: str) -> None:
    result = wstally(*args)
    assert result.returncode == 2
    assert f"wstally {args[0]}: error: argument {says}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("command", "variable", "value", "says"),
    [
        ("serve", "STATS_INTERVAL", "abc", "'abc' is not a number of at least 0"),
        ("serve", "PORT", "99999", "'99999' is out of range: use an integer from 0 to 65535"),
        ("serve", "BUFFER_LIMIT", "-1", "'-1' is out of range: use an integer of at least 0"),
        ("serve", "MAX_CONNECTIONS", "lots", "'lots' is not an integer of at least 1"),
        ("serve", "RATE_LIMIT", "-1", "'-1' is out of range"),
        ("serve", "FLUSH_INTERVAL", "5000", "'5000' is out of range: use a number from 0 to 1000"),
        ("serve", "SLOW_TIMEOUT", "x", "'x' is not a number"),
        ("serve", "PING_INTERVAL", "-2", "'-2' is out of range"),
        ("serve", "PING_TIMEOUT", "nan", "'nan' is out of range"),
        ("serve", "MEMORY", "maybe", "'maybe' is not a switch"),
        ("serve", "COMPRESSION", "2", "'2' is not a switch"),
        ("serve", "LOOP", "tokio", "'tokio': use one of auto, asyncio, uvloop"),
        ("serve", "LOG_LEVEL", "loud", "'loud': use one of debug, info, warning"),
        ("serve", "LOG_FORMAT", "xml", "'xml': use one of auto, console, json"),
        ("client", "URL", "http://127.0.0.1:1", "is an HTTP URL; the WebSocket URL would be"),
        ("watch", "URL", "ftp://x/", "is not a WebSocket URL"),
    ],
)
def test_every_environment_variable_is_checked_like_its_flag(
    command: str, variable: str, value: str, says: str
) -> None:
    name = f"WSTALLY_{variable}"
    result = wstally(command, env={name: value})
    assert result.returncode == 2
    assert f"wstally {command}: error: {name}={value!r}" in result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_variable_concerns_only_the_command_that_reads_it() -> None:
    bad = {"WSTALLY_STATS_INTERVAL": "abc", "WSTALLY_PORT": "x"}
    version = wstally("--version", env=bad)
    assert version.returncode == 0, version.stderr
    assert wstally("client", "--help", env=bad).returncode == 0


def test_a_flag_wins_over_a_bad_variable(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSTALLY_PORT", "99999")
    monkeypatch.setenv("WSTALLY_MEMORY", "yes")
    server = serve("--port", "0")
    assert server.health()["seq"] == 0
    assert server.stop() == 0


def test_help_states_the_exit_codes_and_each_variable() -> None:
    top = wstally("--help")
    for code in ("0 ", "1 ", "2 ", "130"):
        assert f"\n  {code}" in top.stdout
    serve = wstally("serve", "--help").stdout
    for variable in ("PORT", "BUFFER_LIMIT", "MAX_CONNECTIONS", "RATE_LIMIT", "PING_TIMEOUT"):
        assert f"WSTALLY_{variable}" in serve
