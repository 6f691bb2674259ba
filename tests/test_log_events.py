"""The event catalog (docs/logging.md), pinned: each event's level and exact field names.

Events are captured as dicts with structlog's capture_logs() from a real server on
127.0.0.1; the few that only a process can show (signals, a failed start) come from a
``wstally serve`` subprocess's JSON lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs
from structlog.typing import EventDict
from websockets.asyncio.client import connect

from helpers import GatedStore, JsonClient, OpenClient, ServerFactory, within
from servers import ServeProcess
from wstally import logsetup

CONTEXT = {"conn", "peer", "mode"}
HELLO = CONTEXT | {"client", "name"}


class Events:
    """What the server logged, as event dicts (capture_logs adds ``log_level``)."""

    def __init__(self) -> None:
        self.captured: list[EventDict] = []
        self.changed = asyncio.Event()

    def notify(self, _logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        # A processor: every event wakes whoever waits for one.
        self.changed.set()
        return event_dict

    def named(self, name: str) -> list[EventDict]:
        return [e for e in self.captured if e["event"] == name]

    def one(self, name: str) -> EventDict:
        found = self.named(name)
        assert len(found) == 1, (name, self.captured)
        return found[0]

    async def until(self, predicate: Callable[[], object], units: float = 5) -> None:
        async with asyncio.timeout(within(units)):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def wait(self, name: str, units: float = 5) -> EventDict:
        await self.until(lambda: self.named(name), units)
        return self.named(name)[-1]


def fields(event: EventDict) -> set[str]:
    return set(event) - {"event", "log_level"}


@contextlib.contextmanager
def capture(level: str) -> Iterator[Events]:
    """Events at ``level`` and above, with the bound connection context merged in as in
    production. Servers made inside read the level when they are created."""
    logsetup.configure("json", level, stream=io.StringIO())
    events = Events()
    processors = [structlog.contextvars.merge_contextvars, events.notify]
    try:
        with capture_logs(processors=processors) as captured:
            events.captured = captured
            yield events
    finally:
        logsetup.configure("json", os.environ.get("WSTALLY_TEST_LOG_LEVEL", "warning"))


@pytest.fixture
def events() -> Iterator[Events]:
    with capture("debug") as captured:
        yield captured


async def test_server_started_stopping_stopped(make_server: ServerFactory, events: Events) -> None:
    server = await make_server(memory=True)
    started = events.one("server.started")
    assert started["log_level"] == "info"
    assert fields(started) == {
        "engine",
        "url",
        "host",
        "port",
        "store",
        "epoch",
        "seq",
        "total",
        "compression",
        "version",
        "pid",
        "stats_interval",
    }
    assert (started["port"], started["pid"]) == (server.port, os.getpid())
    await server.stop()
    stopping, stopped = events.one("server.stopping"), events.one("server.stopped")
    assert (stopping["log_level"], stopped["log_level"]) == ("info", "info")
    assert fields(stopping) == {"clients", "pending"}
    assert fields(stopped) == {"seq", "total", "epoch", "uptime"}


async def test_a_json_connection_from_open_to_close(
    make_server: ServerFactory, events: Events
) -> None:
    server = await make_server(memory=True)
    client = await JsonClient.connect(server.url, {"client": "c-ann", "name": "ann"})
    assert (await client.add(5, "a1"))["type"] == "ack"
    assert (await client.add(5, "a1"))["duplicate"] is True
    assert (await client.add(2, "a2"))["total"] == 7
    await client.send({"type": "add", "delta": "five", "id": "bad"})
    assert (await client.expect("error"))["code"] == "bad_delta"
    await client.ws.close(4000, "bye \x1b[2J")
    closed = await events.wait("conn.closed")

    opened = events.one("conn.opened")
    assert opened["log_level"] == "info"
    assert fields(opened) == CONTEXT | {"clients", "user_agent"}
    assert opened["mode"] == "json"
    assert opened["peer"].startswith("127.0.0.1:")
    assert "websockets" in opened["user_agent"]
    conn = opened["conn"]
    assert len(conn) == 12

    hello = events.one("conn.hello")
    assert hello["log_level"] == "info"
    assert fields(hello) == HELLO | {"since"}
    assert (hello["client"], hello["name"], hello["conn"]) == ("c-ann", "ann", conn)

    applied = events.named("update.applied")
    assert [e["log_level"] for e in applied] == ["debug", "debug"]
    assert fields(applied[0]) == HELLO | {"seq", "delta", "total", "id"}
    assert [(e["seq"], e["delta"], e["total"], e["id"]) for e in applied] == [
        (1, 5, 5, "a1"),
        (2, 2, 7, "a2"),
    ]
    duplicate = events.one("update.duplicate")
    assert duplicate["log_level"] == "debug"
    assert fields(duplicate) == HELLO | {"id", "seq"}
    assert (duplicate["id"], duplicate["seq"]) == ("a1", 1)

    refused = events.one("update.refused")
    assert refused["log_level"] == "info"
    assert fields(refused) == HELLO | {"code", "id", "input", "refused"}
    assert (refused["code"], refused["id"], refused["refused"]) == ("bad_delta", "bad", 1)
    assert '"five"' in refused["input"]

    assert closed["log_level"] == "info"
    assert fields(closed) == HELLO | {
        "duration",
        "code",
        "reason",
        "messages_in",
        "bytes_in",
        "frames_out",
        "bytes_out",
        "applied",
        "delta_sum",
        "duplicates",
        "refused",
        "lagged",
        "clients",
    }
    assert closed["conn"] == conn
    assert (closed["code"], closed["reason"]) == (4000, "bye \\x1b[2J")  # escaped
    assert (closed["messages_in"], closed["applied"], closed["duplicates"]) == (5, 2, 1)
    assert closed["delta_sum"] == 7  # a1 and a2; the resend of a1 is a duplicate
    assert (closed["refused"], closed["lagged"], closed["clients"]) == (1, 0, 0)
    assert closed["bytes_in"] == sum(len(json.dumps(f)) for f in _sent_frames())
    assert closed["frames_out"] >= 5  # snapshot, three acks, an error, updates
    assert closed["bytes_out"] > 0
    assert closed["duration"] >= 0


def _sent_frames() -> list[dict[str, Any]]:
    return [
        {"type": "hello", "client": "c-ann", "name": "ann"},
        {"type": "add", "delta": 5, "id": "a1"},
        {"type": "add", "delta": 5, "id": "a1"},
        {"type": "add", "delta": 2, "id": "a2"},
        {"type": "add", "delta": "five", "id": "bad"},
    ]


async def test_plain_refusals_are_escaped_and_bounded(
    make_server: ServerFactory, events: Events
) -> None:
    server = await make_server(memory=True)
    async with connect(server.url) as plain:
        await plain.send("\x1b]0;pwned\x07" + "9" * 200)
        assert (await asyncio.wait_for(plain.recv(decode=True), within(5))).startswith("error: ")
    refused = await events.wait("update.refused")
    assert refused["mode"] == "plain"
    assert "client" not in refused
    assert "\x1b" not in refused["input"]
    assert refused["input"].startswith("\\x1b]0;pwned\\x07")
    assert len(refused["input"]) <= 80 + len("\\x1b\\x07") + 1


async def test_a_flood_of_refusals_is_logged_at_info_only_at_first(
    make_server: ServerFactory, events: Events
) -> None:
    server = await make_server(memory=True)
    async with connect(server.url) as plain:
        for _ in range(25):
            await plain.send("x")
        for _ in range(25):
            await asyncio.wait_for(plain.recv(), within(5))
    closed = await events.wait("conn.closed")
    refused = events.named("update.refused")
    assert [e["refused"] for e in refused] == list(range(1, 26))
    assert {e["log_level"] for e in refused[:20]} == {"info"}
    assert {e["log_level"] for e in refused[20:]} == {"debug"}
    assert closed["refused"] == 25


async def test_commits_slow_and_failed(make_server: ServerFactory, events: Events) -> None:
    store = GatedStore()
    server = await make_server(store=store)
    server.batcher.slow_commit = 0.05
    client = await JsonClient.connect(server.url, {"client": "c"})
    assert (await client.add(1, "quick"))["type"] == "ack"
    committed = await events.wait("store.committed")
    assert committed["log_level"] == "debug"
    assert fields(committed) == {"batch", "ms", "first_seq", "last_seq", "pending"}
    assert (committed["batch"], committed["first_seq"], committed["last_seq"]) == (1, 1, 1)

    store.gate.clear()
    await client.send({"type": "add", "delta": 2, "id": "slow"})
    await asyncio.sleep(0.1)
    store.gate.set()
    assert (await client.expect("ack"))["id"] == "slow"
    slow = events.one("store.commit_slow")
    assert slow["log_level"] == "warning"
    assert fields(slow) == fields(committed)
    assert slow["ms"] >= 50
    assert slow["first_seq"] == 2

    store.fail = True
    assert (await client.add(3, "lost"))["code"] == "store_failed"
    failed = events.one("store.commit_failed")
    assert failed["log_level"] == "critical"
    assert fields(failed) == {
        "error",
        "error_type",
        "refused",
        "first_seq",
        "last_seq",
        "total",
    }
    assert (failed["error_type"], failed["first_seq"], failed["total"]) == ("OSError", 3, 3)
    # The committer's events are about a batch, not about the connection that woke it.
    assert not CONTEXT & (fields(committed) | fields(failed))
    await client.close()


def fail_once(owner: object, method: str) -> None:
    """The next call of ``owner.method`` raises; the ones after it work again."""
    works = getattr(owner, method)

    def broken(*args: Any) -> None:
        setattr(owner, method, works)
        raise RuntimeError("boom")

    setattr(owner, method, broken)


async def test_feed_error_is_critical_with_its_traceback(
    make_server: ServerFactory, events: Events, open_client: OpenClient
) -> None:
    server = await make_server(memory=True)
    client = await open_client(server.url)
    fail_once(server.hub, "publish")
    await client.send({"type": "add", "delta": 1})
    error = await events.wait("feed.error")
    assert error["log_level"] == "critical"
    assert error["exc_info"] is True
    # The feed goes on. The update the hub never took leaves a gap before the next one:
    # the client is told the new position (a snapshot) rather than skipping it unawares.
    await client.send({"type": "add", "delta": 1})
    snapshot = await client.expect("snapshot")
    assert (snapshot["seq"], snapshot["total"], snapshot["recovered"]) == (2, 2, False)
    assert (await events.wait("broadcast.gap"))["next"] == 2
    await client.send({"type": "add", "delta": 1})
    assert (await client.expect("updates"))["seq"] == 3


async def test_batcher_error_is_critical_with_its_traceback(
    make_server: ServerFactory, events: Events, open_client: OpenClient
) -> None:
    server = await make_server(memory=True)
    client = await open_client(server.url)
    fail_once(server.hub, "send")
    await client.send({"type": "add", "delta": 1, "id": "lost-ack"})
    error = await events.wait("batcher.error")
    assert error["log_level"] == "critical"
    assert error["exc_info"] is True
    assert (await client.add(1, "next"))["type"] == "ack"


async def test_server_stats_every_interval(make_server: ServerFactory, events: Events) -> None:
    server = await make_server(memory=True, stats_interval=0.05)
    client = await JsonClient.connect(server.url, {"client": "c"})
    for i in range(3):
        await client.add(1, f"s{i}")
    await events.until(lambda: any(e["updates"] for e in events.named("server.stats")))
    stats = next(e for e in events.named("server.stats") if e["updates"])
    assert stats["log_level"] == "info"
    assert fields(stats) == {
        "interval",
        "connections",
        "opened",
        "closed",
        "updates",
        "updates_per_s",
        "deliveries",
        "deliveries_per_s",
        "refused",
        "commits",
        "batch_mean",
        "batch_max",
        "commit_max_ms",
        "lagging",
        "lagged",
        "seq",
        "total",
        "cpu_s",
        "rss_kib",
    }
    every = events.named("server.stats")
    assert sum(e["updates"] for e in every) == 3
    assert sum(e["opened"] for e in every) == 1
    assert sum(e["commits"] for e in every) >= 1
    assert stats["connections"] == 1
    assert stats["batch_max"] >= 1
    assert stats["updates_per_s"] > 0
    assert isinstance(stats["rss_kib"], int)
    assert stats["rss_kib"] > 1000
    # Server-wide figures: no connection context, even though a connection is open.
    assert not CONTEXT & fields(stats)
    await client.close()
    await server.stop()
    count = len(events.named("server.stats"))
    await asyncio.sleep(0.12)
    assert len(events.named("server.stats")) == count  # stopped with the server


async def test_no_stats_when_the_interval_is_zero(
    make_server: ServerFactory, events: Events
) -> None:
    server = await make_server(memory=True, stats_interval=0)
    await asyncio.sleep(0.05)
    assert events.named("server.stats") == []
    assert server._stats_task is None


async def test_lagging_and_resync_name_the_slow_connection(
    make_server: ServerFactory, events: Events
) -> None:
    limit = 8 * 1024
    server = await make_server(memory=True, buffer_limit=limit)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    slow = await connect(server.url, sock=sock, max_queue=1)
    sender = await JsonClient.connect(server.url, {"client": "sender", "name": "n" * 32})
    peer = next(p for p in server.hub.peers if p.mode.value == "plain")
    peer.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = 0
    async with asyncio.timeout(within(20)):
        while peer.lagged == 0:
            for _ in range(100):
                await sender.send({"type": "add", "delta": 1})
            sent += 100
            await sender.items_until(sent)
    lagging = events.one("broadcast.lagging")
    assert lagging["log_level"] == "warning"
    assert fields(lagging) == CONTEXT | {"buffered", "limit", "lagged", "seq", "lagging"}
    # The slow peer, not the sender whose add triggered the write.
    assert (lagging["conn"], lagging["mode"]) == (peer.id, "plain")
    assert lagging["buffered"] > lagging["limit"] == limit
    assert (lagging["lagged"], lagging["lagging"]) == (1, 1)
    # Keep sending while it lags: still one event for this episode.
    for _ in range(200):
        await sender.send({"type": "add", "delta": 1})
    sent += 200
    await sender.items_until(sent)
    assert len(events.named("broadcast.lagging")) == 1
    # Now read everything, up to the resync (the current total, as a plain client gets
    # it): that is logged with the same identity.
    async with asyncio.timeout(within(10)):
        while await slow.recv() != f"Server records total={sent}" or not events.named(
            "conn.resynced"
        ):
            pass
    resynced = events.one("conn.resynced")
    assert resynced["log_level"] == "info"
    assert fields(resynced) == CONTEXT | {"seq", "lagged", "missed", "lag_seconds"}
    assert resynced["conn"] == peer.id
    assert resynced["lagged"] == 1
    assert resynced["missed"] > 0
    assert resynced["lag_seconds"] >= 0
    await slow.close()
    await sender.close()
    closed = [e for e in events.named("conn.closed") if e["conn"] == peer.id]
    assert closed[0]["lagged"] == 1


async def test_recovered_and_not_recovered(
    make_server: ServerFactory, events: Events, open_client: OpenClient
) -> None:
    server = await make_server(memory=True)
    writer = await open_client(server.url, {"client": "w"})
    for i in range(3):
        await writer.add(1, f"w{i}")
    await writer.items_until(3)  # published, not only acked
    epoch = writer.snapshot["epoch"]
    await open_client(server.url, {"client": "r", "since": 1, "epoch": epoch})
    await open_client(server.url, {"client": "n", "since": 1, "epoch": "other"})
    recovered = await events.wait("conn.recovered")
    assert recovered["log_level"] == "info"
    assert fields(recovered) == HELLO | {"since", "updates", "seq"}
    assert (recovered["client"], recovered["since"], recovered["updates"]) == ("r", 1, 2)
    refused = await events.wait("conn.not_recovered")
    assert refused["log_level"] == "info"
    assert fields(refused) == HELLO | {"since", "reason", "seq"}
    assert (refused["client"], refused["seq"]) == ("n", 3)
    assert "epoch" in refused["reason"]


async def test_evicted_slow_consumer(make_server: ServerFactory, events: Events) -> None:
    server = await make_server(memory=True, buffer_limit=8 * 1024, slow_timeout=0.1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    slow = await connect(server.url, sock=sock, max_queue=1)
    sender = await JsonClient.connect(server.url, {"client": "sender"})
    peer = next(p for p in server.hub.peers if p.mode.value == "plain")
    peer.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = 0
    async with asyncio.timeout(within(20)):
        while not events.named("conn.evicted"):
            for _ in range(100):
                await sender.send({"type": "add", "delta": 1})
            sent += 100
            await sender.items_until(sent)
    evicted = events.one("conn.evicted")
    assert evicted["log_level"] == "warning"
    assert fields(evicted) == CONTEXT | {"buffered", "lagging_for", "code"}
    assert (evicted["conn"], evicted["code"]) == (peer.id, 4008)
    assert evicted["lagging_for"] >= 0.1
    slow.transport.abort()
    await sender.close()
    await events.until(lambda: [e for e in events.named("conn.closed") if e["conn"] == peer.id])
    closed = next(e for e in events.named("conn.closed") if e["conn"] == peer.id)
    assert closed["lagged"] >= 1  # (on a loaded machine it may drain and lag again)


async def test_every_line_is_json_with_time_level_event_and_connection(
    make_server: ServerFactory,
) -> None:
    """The real chain, rendered: websockets' own records carry the connection too."""
    stream = io.StringIO()
    logsetup.configure("json", "info", stream=stream)
    try:
        server = await make_server(memory=True)
        client = await JsonClient.connect(server.url, {"client": "c-1", "name": "bo"})
        await client.add(1, "one")
        await client.close()
        await server.stop()
    finally:
        logsetup.configure("json", os.environ.get("WSTALLY_TEST_LOG_LEVEL", "warning"))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines
    for line in lines:
        assert list(line)[:3] == ["timestamp", "level", "event"]
        assert line["timestamp"].endswith("Z")
        assert line["level"] in ("info", "warning")
    opened = next(e for e in lines if e["event"] == "conn.opened")
    conn = opened["conn"]
    about_it = [e for e in lines if e.get("conn") == conn]
    names = [e["event"] for e in about_it]
    # websockets' own "connection open" / "connection closed" only repeated these: dropped.
    assert names == ["conn.opened", "conn.hello", "conn.closed"], names
    for event in about_it:
        assert event["peer"] == opened["peer"]
        assert event["mode"] == "json"
    assert next(e for e in about_it if e["event"] == "conn.closed")["client"] == "c-1"
    # Server-wide lines carry no connection.
    assert "conn" not in next(e for e in lines if e["event"] == "server.stopped")


async def test_no_debug_events_at_info(make_server: ServerFactory) -> None:
    with capture("info") as events:
        server = await make_server(memory=True)
        client = await JsonClient.connect(server.url)
        await client.add(1, "x")
        await client.add(1, "x")
        await client.close()
        await events.wait("conn.closed")
        await server.stop()
    # Per-update events are not even built: the server decided so once, at its start.
    assert server.handler._debug is False
    assert server.batcher._debug is False
    assert [e for e in events.captured if e["log_level"] == "debug"] == []
    assert events.one("conn.closed")["applied"] == 1


# Events only a process shows


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wstally", "serve", "--log-format", "json", *args],
        capture_output=True,
        text=True,
        timeout=within(20),
        cwd=tmp_path,
    )


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_server_failed(tmp_path: Path) -> None:
    result = _serve(tmp_path, "--port", "0", "--db", "/nonexistent/x.db")
    assert result.returncode == 1
    failed = [e for e in _json_lines(result.stderr) if e["event"] == "server.failed"]
    assert len(failed) == 1
    assert failed[0]["level"] == "error"
    assert set(failed[0]) == {"timestamp", "level", "event", "logger", "error"}
    assert "cannot open database" in failed[0]["error"]


def test_server_signal_then_forced_exit(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path, "--memory", "--port", "0", "--stats-interval", "0")
    try:
        # A client that completes the handshake, then never reads nor answers the close:
        # the graceful stop waits for it, and a second signal cuts the wait short.
        raw = socket.create_connection(("127.0.0.1", server.port))
        raw.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert raw.recv(4096).startswith(b"HTTP/1.1 101")
        server.proc.send_signal(signal.SIGTERM)
        assert _wait_for(server, "server.stopping")
        assert server.stop(signal.SIGTERM) == 1
        raw.close()
    finally:
        server.close()
    first = server.event("server.signal")
    assert (first["level"], first["signal"]) == ("info", "SIGTERM")
    forced = server.event("server.forced_exit")
    assert (forced["level"], forced["signal"]) == ("warning", "SIGTERM")
    assert not [e for e in server.events if e.get("event") == "server.stopped"]


def _wait_for(server: ServeProcess, name: str) -> bool:
    deadline = time.monotonic() + within(10)
    while time.monotonic() < deadline:
        if any(e.get("event") == name for e in server.events):
            return True
        time.sleep(0.01)
    return False
