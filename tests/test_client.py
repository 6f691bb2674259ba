"""``wstally client`` and ``wstally watch`` as people use them: real terminals, real pipes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pexpect
import pytest
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import serve as serve_sync

from helpers import within

if TYPE_CHECKING:
    Term = pexpect.spawn[str]
else:
    Term = pexpect.spawn


@pytest.fixture
def terminals() -> Iterator[list[Term]]:
    spawned: list[Term] = []
    yield spawned
    for term in spawned:
        term.close(force=True)


def terminal(terminals: list[Term], *args: str) -> Term:
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    term = pexpect.spawn(
        sys.executable,
        ["-m", "wstally", *args],
        env=env,
        dimensions=(30, 100),
        timeout=within(10),
        encoding="utf-8",
        codec_errors="replace",
    )
    terminals.append(term)
    return term


# Styling puts escape sequences between the words of a line: match through them.
_GAP = r"(?:\x1b\[[0-9;?]*[A-Za-z]|[ ])*"


def line(*words: str) -> str:
    return _GAP.join(re.escape(word) for word in words)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_interactive_clients_and_a_watcher(serve: Any, terminals: list[Term]) -> None:
    server = serve("--memory", "--port", "0")
    url = server.url
    watcher = terminal(terminals, "watch", url)
    ann = terminal(terminals, "client", url, "--name", "ann")
    bob = terminal(terminals, "client", url, "--name", "bob")
    for term in (ann, bob):
        term.expect("connected to")
    ann.sendline("5")
    ann.expect("acked as #1")
    bob.expect(line("+5", "→", "5", "ann"))
    watcher.expect("ann")
    # Ann starts typing; Bob's update arrives meanwhile; Ann's half-typed line survives.
    ann.send("1")
    bob.sendline("-3")
    ann.expect(line("-3", "→", "2", "bob"))
    ann.send("2\r")
    ann.expect(r"acked as #3")
    bob.expect(line("+12", "→", "14", "ann"))
    watcher.expect("14")
    # A bad entry is refused locally and never sent.
    bob.sendline("1e3")
    bob.expect("not sent: not an integer")
    assert server.health()["total"] == 14
    # Ctrl-D leaves cleanly.
    for term in (ann, bob):
        term.sendcontrol("d")
        term.expect(pexpect.EOF)
        term.close()
        assert term.exitstatus == 0, term.before
    watcher.sendcontrol("c")
    watcher.expect(pexpect.EOF)
    watcher.close()
    assert "Traceback" not in (watcher.before or "")
    assert watcher.exitstatus == 130  # interrupted, as for every command


def test_ctrl_c_leaves_without_a_traceback(serve: Any, terminals: list[Term]) -> None:
    server = serve("--memory", "--port", "0")
    term = terminal(terminals, "client", server.url)
    term.expect("connected to")
    term.sendcontrol("c")
    term.expect(pexpect.EOF)
    term.close()
    assert "Traceback" not in (term.before or "")
    # Interrupted, as every command reports Ctrl-C (README, "Exit status").
    assert term.exitstatus == 130


def test_quit_with_adds_unacknowledged_exits_1(terminals: list[Term]) -> None:
    term = terminal(terminals, "client", f"127.0.0.1:{free_port()}")
    term.expect("connection refused")
    term.sendline("3")
    term.expect("queued: will be sent when connected")
    term.sendline("/quit")
    term.expect("1 add\\(s\\) were never acknowledged")
    term.expect(pexpect.EOF)
    term.close()
    assert term.exitstatus == 1  # as piped mode does when adds are left unacknowledged


def test_the_interactive_client_says_what_happened_across_a_restart(
    serve: Any, terminals: list[Term], tmp_path: Path
) -> None:
    port = free_port()
    db = str(tmp_path / "restart.db")
    term = terminal(terminals, "client", f"127.0.0.1:{port}")
    # (The status line needs a terminal that answers cursor position requests; what it
    # shows is pinned in test_session.py.)
    term.expect("connection refused")
    server = serve("--db", db, "--port", str(port))
    term.expect("connected to")
    term.sendline("5")
    term.expect("acked as #1")
    server.proc.kill()
    server.wait()
    term.expect("connection refused")
    term.sendline("3")
    term.expect("queued: will be sent when connected")
    serve("--db", db, "--port", str(port))
    term.expect("connected to")
    term.expect("resending 1 unacknowledged add")
    seen = ""
    for _ in range(2):  # the recovery note and the ack, in whichever order they come
        term.expect(["✓ nothing was missed while away", r"acked as #2"])
        seen += f"{term.before}{term.after}"
    assert "nothing was missed" in seen
    assert "caught up" not in seen
    term.sendline("/quit")
    term.expect(pexpect.EOF)
    term.close()
    assert term.exitstatus == 0


def test_watch_drops_the_connection_error_once_reconnected(
    serve: Any, terminals: list[Term]
) -> None:
    port = free_port()
    watcher = terminal(terminals, "watch", f"ws://127.0.0.1:{port}/")
    watcher.expect("connection refused")
    server = serve("--memory", "--port", str(port))
    watcher.expect("connected")
    after = ""
    assert run_piped(server.url, "7\n").returncode == 0
    watcher.expect(line("+7", "7"))
    after += watcher.before or ""
    # The view is redrawn 8 times a second: a stale note would be in every frame.
    watcher.expect(pexpect.TIMEOUT, timeout=within(1))
    after += watcher.before or ""
    assert "refused" not in after
    watcher.sendcontrol("c")
    watcher.expect(pexpect.EOF)


def run_piped(url: str, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wstally", "client", url, *args],
        input=text,
        capture_output=True,
        text=True,
        timeout=within(60),
    )


def pipe_numbers(url: str, count: int) -> subprocess.CompletedProcess[str]:
    """1 to ``count``, one a line, piped into the client: it must print their sum."""
    result = run_piped(url, "".join(f"{i}\n" for i in range(1, count + 1)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(count * (count + 1) // 2)
    return result


def test_piped_mode_sums_exactly(serve: Any) -> None:
    server = serve("--memory", "--port", "0")
    result = pipe_numbers(server.url, 100)
    assert "100 of 100 add(s) acknowledged" in result.stderr
    assert server.health()["total"] == 5050


def test_piped_mode_reports_bad_lines_and_refusals(serve: Any) -> None:
    server = serve("--memory", "--port", "0")
    text = "5\nabc\n9223372036854775807\n"
    result = run_piped(server.url, text)
    assert result.returncode == 1
    assert "line 2 not sent: not an integer" in result.stderr
    assert "refused (overflow)" in result.stderr
    assert server.health()["total"] == 5


def test_piped_summary_counts_what_was_acknowledged(serve: Any) -> None:
    server = serve("--memory", "--port", "0")
    assert run_piped(server.url, "1\n").returncode == 0
    refused = run_piped(server.url, "9223372036854775807\n")  # would overflow the total
    assert refused.returncode == 1
    # The refused add is not in the sum, and the summary says it was refused.
    assert "0 of 1 add(s) acknowledged (sum +0); 1 refused" in refused.stderr
    skipped = run_piped(server.url, "1\nx\n2\n\n1e3\n3\n")
    assert skipped.returncode == 1
    assert "3 of 3 add(s) acknowledged (sum +6); 2 line(s) skipped: not a number" in (
        skipped.stderr
    )
    assert skipped.stdout.strip() == "7"
    nothing = run_piped(server.url, "abc\n")
    assert nothing.returncode == 1
    assert nothing.stdout.strip() == "7"  # the server's total, though nothing was added


def test_piped_mode_paces_itself_under_the_default_rate_limit(serve: Any) -> None:
    # 40,000 numbers at once are four seconds' worth at the default 10,000 adds/s: the
    # refused ones are resent, same ids, at the pace the server accepts.
    server = serve("--memory", "--port", "0")
    result = pipe_numbers(server.url, 40_000)
    assert "40000 of 40000 add(s) acknowledged (sum +800020000)" in result.stderr
    health = server.health()
    assert (health["total"], health["seq"]) == (800020000, 40_000)
    # One connection throughout: never over the server's frame budget (closed with 1008).
    assert len([e for e in server.events if e.get("event") == "conn.opened"]) == 1


def test_piped_mode_meets_a_low_rate_limit_and_still_counts_every_add(serve: Any) -> None:
    # (On a loaded machine the default limit may never be met: this one always is.)
    server = serve("--memory", "--port", "0", "--rate-limit", "2000")
    result = pipe_numbers(server.url, 8_000)
    assert "slowing down" in result.stderr  # the limit was met, not avoided
    assert server.health()["seq"] == 8_000


def test_a_bare_host_and_port_is_a_ws_url(serve: Any) -> None:
    server = serve("--memory", "--port", "0")
    result = run_piped(f"127.0.0.1:{server.port}", "4\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4"


@pytest.mark.parametrize("command", ["client", "watch"])
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://127.0.0.1:8765", "the WebSocket URL would be ws://127.0.0.1:8765/"),
        ("https://tally.example/x", "the WebSocket URL would be wss://tally.example/x"),
        ("ws://127.0.0.1:99999/", "use ws://HOST:PORT/ or wss://HOST:PORT/"),
        ("ftp://x/", "use ws://HOST:PORT/ or wss://HOST:PORT/"),
    ],
)
def test_a_wrong_url_is_one_usage_line(command: str, url: str, says: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wstally", command, url],
        input="",
        capture_output=True,
        text=True,
        timeout=within(20),
    )
    assert result.returncode == 2
    assert says in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"wstally {command}: error: argument url:")


def test_handshake_refusals_are_named(serve: Any) -> None:
    guarded = serve("--memory", "--port", "0", "--token", "sesame")
    no_token = run_piped(guarded.url, "1\n")
    assert no_token.returncode == 2
    assert "the server wants a token (pass --token or set WSTALLY_TOKEN) (HTTP 401" in (
        no_token.stderr
    )
    wrong = run_piped(guarded.url, "1\n", "--token", "nope")
    assert wrong.returncode == 2
    assert "the server did not accept the token (HTTP 401" in wrong.stderr
    lost = run_piped(guarded.url + "elsewhere", "1\n", "--token", "sesame")
    assert lost.returncode == 2
    assert "no WebSocket endpoint at this URL (HTTP 404" in lost.stderr
    for result in (no_token, wrong, lost):
        assert "cannot reach" not in result.stderr
        assert "Traceback" not in result.stderr


def test_a_full_server_is_reported_as_full(serve: Any) -> None:
    server = serve("--memory", "--port", "0", "--max-connections", "1")
    with ws_connect(server.url, open_timeout=within(5)):
        result = run_piped(server.url, "1\n", "--timeout", "1")
    assert result.returncode == 2
    assert "the server is full (HTTP 503" in result.stderr
    assert "cannot reach" not in result.stderr


def test_a_forbidden_client_is_told_so() -> None:
    # A real server that answers every handshake with 403, as an origin check would.
    def forbid(connection: Any, request: Any) -> Any:
        return connection.respond(HTTPStatus.FORBIDDEN, "Forbidden: origin not allowed\n")

    with serve_sync(lambda ws: None, "127.0.0.1", 0, process_request=forbid) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            port = server.socket.getsockname()[1]
            result = run_piped(f"ws://127.0.0.1:{port}/", "1\n")
            watch = subprocess.run(
                [sys.executable, "-m", "wstally", "watch", f"ws://127.0.0.1:{port}/"],
                capture_output=True,
                text=True,
                timeout=within(20),
            )
        finally:
            server.shutdown()
            thread.join(within(5))
    assert result.returncode == 2
    assert "the server forbids this client (HTTP 403: Forbidden: origin not allowed)" in (
        result.stderr
    )
    assert watch.returncode == 2
    assert "HTTP 403" in watch.stderr


def test_piped_mode_gives_up_on_an_unreachable_server() -> None:
    started = time.monotonic()
    result = run_piped(f"ws://127.0.0.1:{free_port()}", "1\n", "--timeout", "1")
    assert result.returncode == 2
    assert "no connection to" in result.stderr
    assert "connection refused" in result.stderr
    assert time.monotonic() - started < within(15)


def test_server_killed_and_restarted_mid_stream_counts_each_add_once(
    serve: Any, tmp_path: Path
) -> None:
    port = str(free_port())
    db = str(tmp_path / "crash.db")
    server = serve("--db", db, "--port", port)
    url = server.url
    client = subprocess.Popen(
        [sys.executable, "-m", "wstally", "client", url, "--timeout", "30"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None
    try:
        client.stdin.write("".join(f"{i}\n" for i in range(1, 501)))
        client.stdin.flush()
        deadline = time.monotonic() + within(10)
        while server.health()["seq"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        server.proc.send_signal(signal.SIGKILL)
        server.wait()
        client.stdin.write("".join(f"{i}\n" for i in range(501, 1001)))
        client.stdin.flush()
        time.sleep(0.3)  # the client is now reconnecting with adds queued
        restarted = serve("--db", db, "--port", port)
        out, err = client.communicate(timeout=within(60))  # closes stdin: end of input
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
    assert client.returncode == 0, err
    assert out.strip() == str(sum(range(1, 1001)))
    health = restarted.health()
    assert health["total"] == 500500
    # Every add is one row in the audit trail: nothing lost, nothing twice.
    assert health["seq"] == 1000


def test_a_hostile_name_reaches_other_terminals_escaped(serve: Any, terminals: list[Term]) -> None:
    server = serve("--memory", "--port", "0")
    viewer = terminal(terminals, "client", server.url)
    viewer.expect("connected to")
    result = run_piped(server.url, "1\n", "--name", "\x1b[2Jevil")
    assert result.returncode == 0, result.stderr
    viewer.expect_exact("\\x1b[2Jevil")
    assert "\x1b[2Jevil" not in f"{viewer.before}{viewer.after}"


def test_watch_prints_one_line_per_update_when_piped(serve: Any) -> None:
    server = serve("--memory", "--port", "0")
    watch = subprocess.Popen(
        [sys.executable, "-m", "wstally", "watch", server.url, "--exit-after", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    json_watch = subprocess.Popen(
        [sys.executable, "-m", "wstally", "watch", server.url, "--json", "--exit-after", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0 * within(1))
    result = run_piped(server.url, "4\n-1\n10\n", "--name", "\x1b]0;pwned\x07")
    assert result.returncode == 0, result.stderr
    out, err = watch.communicate(timeout=within(30))
    jout, _ = json_watch.communicate(timeout=within(30))
    assert watch.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == "seq=1 delta=+4 total=4 by=\\x1b]0;pwned\\x07"
    assert [line.split()[2] for line in lines] == ["total=4", "total=3", "total=13"]
    items = [json.loads(line) for line in jout.splitlines()]
    assert [i["total"] for i in items] == [4, 3, 13]
    assert items[0]["by"] == "\\x1b]0;pwned\\x07"
    assert "\x1b" not in out + jout


@pytest.mark.parametrize("command", ["client", "watch"])
def test_ctrl_c_piped_is_130_without_a_traceback(serve: Any, command: str) -> None:
    server = serve("--memory", "--port", "0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "wstally", command, server.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write("5\n")  # (watch reads no stdin)
        proc.stdin.flush()
        deadline = time.monotonic() + within(10)
        while server.health()["clients"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=within(10))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    assert "Traceback" not in err
