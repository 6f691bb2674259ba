"""Hardening II: each attack that once broke the server, reproduced with real sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from helpers import GatedStore, JsonClient, ServerFactory, http_get, within
from servers import ServeProcess
from wstally import protocol
from wstally.batcher import MAX_BATCH
from wstally.protocol import SUBPROTOCOL
from wstally.recovery import MAX_RECOVERY
from wstally.server import FD_RESERVE, FLOW_HIGH
from wstally.store import MemoryStore
from wstally.tally import Update

SECRET = "s3cr3t-T0KEN-do-not-log"


async def handshake(port: int, *headers: str, path: str = "/") -> tuple[int, bytes]:
    """A raw WebSocket handshake with exactly these extra header lines; (status, body)."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *headers,
    ]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), within(5))
    status = int(head.split(b" ", 2)[1])
    body = b""
    if status != 101:
        body = await asyncio.wait_for(reader.read(), within(5))
    writer.close()
    return status, body


# 1. The token never reaches a log, on any path.


REPEATED = [
    ("Authorization: Bearer x", f"Authorization: Bearer {SECRET}"),
    (f"Authorization: Bearer {SECRET}", f"Authorization: Bearer {SECRET}"),
    ("User-Agent: a", "User-Agent: b", f"Authorization: Bearer {SECRET}"),
    ("Origin: http://a.test", "Origin: http://b.test"),
    ("Host: other",),
]


async def test_the_token_never_reaches_the_log(
    serve: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    log_file = tmp_path / "server.log"
    server = serve(
        "--memory", "--port", "0", "--token", SECRET, "--log-file", str(log_file),
        "--log-level", "debug",
    )  # fmt: skip
    port = server.port
    for headers in REPEATED:
        status, body = await handshake(port, *headers)
        assert status == 400, (headers, body)
        assert b"repeated" in body
        assert SECRET.encode() not in body
    # A wrong token, a token in the query string, and an accepted one.
    assert (await handshake(port, "Authorization: Bearer wrong"))[0] == 401
    assert (await handshake(port, "Authorization: Bearer"))[0] == 401
    assert (await handshake(port, f"Authorization: Basic {SECRET}"))[0] == 401
    assert (await handshake(port, path=f"/?token={SECRET}"))[0] == 101
    async with connect(
        server.url,
        subprotocols=[SUBPROTOCOL],
        additional_headers={"Authorization": f"Bearer {SECRET}"},
    ) as ws:
        await ws.recv()
        await ws.send(f'{{"type":"add","delta":1,"id":"{SECRET}"}}')
        await ws.send(SECRET)  # not JSON: refused, and the input is logged (escaped)
        await ws.recv()
    status, _, _ = await http_get(port, f"/healthz?token={SECRET}")
    assert status == 200
    assert server.stop() == 0
    logged = log_file.read_text() + "".join(server.raw)
    assert "handshake" in logged or "conn.opened" in logged  # something was logged
    assert SECRET not in logged
    assert "[redacted]" in logged


async def test_a_crashing_handler_logs_no_locals(
    make_server: ServerFactory, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from wstally import logsetup

    log_file = tmp_path / "crash.log"
    logsetup.configure("json", "info", str(log_file))
    try:
        server = await make_server(memory=True, token=SECRET)

        def crash(peer: Any, message: Any) -> None:
            token = server.config.token  # a local holding the secret, as in the leak
            raise RuntimeError(f"boom while checking {token}")

        server.handler._on_message = crash  # type: ignore[method-assign]
        async with connect(
            server.url,
            subprotocols=[SUBPROTOCOL],
            additional_headers={"Authorization": f"Bearer {SECRET}"},
        ) as ws:
            await ws.send("1")
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), within(5))
        await server.stop()
    finally:
        logsetup.configure("json", os.environ.get("WSTALLY_TEST_LOG_LEVEL", "warning"))
    logged = log_file.read_text()
    assert "RuntimeError" in logged  # the failure is there, with its traceback...
    assert SECRET not in logged  # ...but neither the locals nor the secret
    assert '"locals"' not in logged
    out, err = capfd.readouterr()
    assert SECRET not in out + err


# 2. Malformed handshakes never stay counted.


async def test_malformed_handshakes_do_not_lock_everyone_out(
    serve: Callable[..., ServeProcess],
) -> None:
    server = serve("--memory", "--port", "0", "--max-connections", "5")
    port = server.port
    for _ in range(20):
        status, _ = await handshake(port, "User-Agent: a", "User-Agent: b")
        assert status == 400
    assert server.health()["clients"] == 0
    client = await JsonClient.connect(server.url)
    assert (await client.add(3, "a"))["type"] == "ack"
    assert server.health()["clients"] == 1
    await client.close()
    assert not [e for e in server.events if e.get("level") in ("error", "critical")]


# 3. Heavy legal load: bounded batches, bounded frames, backpressure.


async def test_commits_falling_behind_stop_the_reading(
    make_server: ServerFactory, clients: list[JsonClient]
) -> None:
    store = GatedStore()
    server = await make_server(store=store, rate_limit=0)
    watcher = await JsonClient.connect(server.url)
    clients.append(watcher)
    store.gate.clear()  # the disk stalls
    senders = []
    for _ in range(4):
        ws = await connect(server.url, subprotocols=[SUBPROTOCOL], max_queue=None)
        await ws.recv()
        senders.append(ws)
    per_sender = 3 * FLOW_HIGH // 4  # 3x the gate's mark in all
    # The watcher reads all along, as a live client does: one left unread for the whole run
    # fills its socket and is (rightly) resynced with a snapshot, leaving a gap in its items.
    watching = asyncio.create_task(watcher.items_until(4 * per_sender, within(60)))

    async def blast(ws: Any, i: int) -> None:
        name = "n" * protocol.MAX_NAME
        await ws.send(json.dumps({"type": "hello", "client": f"c{i}", "name": name}))
        for n in range(per_sender):
            delta = 10**15 if n % 2 else -(10**15)  # big, and the total stays in int64
            await ws.send(f'{{"type":"add","delta":{delta},"id":"{n}"}}')

    blasting = [asyncio.create_task(blast(ws, i)) for i, ws in enumerate(senders)]
    async with asyncio.timeout(within(30)):
        while not server.flow.blocked:  # noqa: ASYNC110 - polled server state
            await asyncio.sleep(0.01)
    await asyncio.sleep(within(0.5))
    # The gate closed: what is applied but not committed stays near its mark, while the
    # rest waits in socket buffers (the senders' own sends stall).
    assert server.flow.blocked
    backlog = server.batcher.backlog  # (the batch on its way to disk comes on top)
    assert FLOW_HIGH <= backlog <= FLOW_HIGH + 4 * 64, backlog
    read = sum(p.messages_in for p in server.hub.peers)
    await asyncio.sleep(within(0.5))
    assert sum(p.messages_in for p in server.hub.peers) == read  # nothing more is read
    assert read < 4 * per_sender  # the rest waits in the sockets
    store.gate.set()
    await asyncio.gather(*blasting)
    acks = 0
    for ws in senders:
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), within(30)))
            if frame["type"] == "ack":
                acks += 1
                if frame["id"] == str(per_sender - 1):
                    break
            assert frame["type"] != "error", frame
    assert acks == 4 * per_sender
    assert max(store.commits) <= MAX_BATCH
    # Every watcher frame is bounded; the updates arrive in order, without a gap.
    total_items = await watching
    assert [f["type"] for f in watcher.frames].count("snapshot") == 1  # never resynced
    assert [i["seq"] for i in total_items] == list(range(1, 4 * per_sender + 1))
    sizes = [len(json.dumps(f, separators=(",", ":"))) for f in watcher.frames]
    assert max(sizes) <= protocol.MAX_SERVER_FRAME
    for ws in senders:
        await ws.close()


async def test_a_long_backlog_goes_out_as_bounded_frames(
    make_server: ServerFactory,
) -> None:
    store = GatedStore()
    server = await make_server(store=store, rate_limit=0)
    sizes: list[int] = []
    items: list[int] = []
    # websockets' default 1 MiB limit, as `wstally client` and `watch` have it.
    async with connect(server.url, subprotocols=[SUBPROTOCOL]) as watcher:
        await watcher.recv()
        store.gate.clear()
        async with connect(server.url) as sender:  # plain mode: no acks to read
            for n in range(3 * MAX_BATCH):
                await sender.send(str(2**62 if n % 2 else -(2**62)))
            await asyncio.sleep(within(0.5))
            store.gate.set()
            while not items or items[-1] < 3 * MAX_BATCH:
                raw = await asyncio.wait_for(watcher.recv(), within(10))
                sizes.append(len(raw))
                frame = json.loads(raw)
                if frame["type"] == "updates":
                    items += [i["seq"] for i in frame["items"]]
    assert items == list(range(1, 3 * MAX_BATCH + 1))
    assert max(sizes) <= protocol.MAX_SERVER_FRAME
    assert len(sizes) >= 3 * MAX_BATCH // protocol.UPDATES_PER_FRAME


def test_the_worst_item_fits_the_frame_bound() -> None:
    from wstally.tally import INT64_MIN

    worst = Update(2**63 - 1, INT64_MIN, INT64_MIN, 0.0, "c", "c", "\U0001f600" * 32, "i")
    frame = protocol.encode_updates([worst] * protocol.UPDATES_PER_FRAME)
    assert len(frame.encode()) <= protocol.MAX_SERVER_FRAME


# 4. Replays cannot be used to amplify.


async def test_a_replaying_client_that_never_reads_is_evicted(
    make_server: ServerFactory, clients: list[JsonClient]
) -> None:
    store = MemoryStore()
    store.commit([Update(n, 1, n, 0.0, "prefill") for n in range(1, MAX_RECOVERY + 1)])
    server = await make_server(store=store, slow_timeout=within(1))
    epoch = server.position.epoch
    attackers = []
    for i in range(8):
        # A tiny receive buffer: the kernel cannot absorb the replay for the attacker.
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ws = await connect(server.url, subprotocols=[SUBPROTOCOL], sock=sock)
        await ws.send(json.dumps({"type": "hello", "client": f"a{i}", "since": 0, "epoch": epoch}))
        ws.transport.pause_reading()  # and never read again
        attackers.append(ws)
    honest = await JsonClient.connect(
        server.url, {"client": "h", "since": MAX_RECOVERY - 3000, "epoch": epoch}
    )
    clients.append(honest)
    # The honest client's replay is not held up by the attackers'.
    seen = await honest.items_until(MAX_RECOVERY, within(20))
    assert [i["seq"] for i in seen] == list(range(MAX_RECOVERY - 2999, MAX_RECOVERY + 1))
    assert (await honest.add(1, "during"))["type"] == "ack"
    # Every attacker ends up evicted with 4008; none buffers more than the limit meanwhile.
    async with asyncio.timeout(within(30)):
        while server.hub.evicted < len(attackers):
            buffered = [p.ws.transport.get_write_buffer_size() for p in server.hub.peers]
            assert max(buffered) <= server.hub.buffer_limit + protocol.MAX_SERVER_FRAME
            await asyncio.sleep(0.05)
    for ws in attackers:
        ws.transport.abort()


# 5. Floods of frames that are not adds.


@pytest.mark.parametrize("kind", ["ping", "text"])
async def test_a_frame_flood_is_closed_with_1008(
    serve: Callable[..., ServeProcess], kind: str
) -> None:
    server = serve("--memory", "--port", "0")
    honest = await JsonClient.connect(server.url)
    # max_queue=None: websockets keeps reading the refusals the flood earns, so the close
    # frame is read too (with its default queue of 16, a flooder that never reads stops
    # reading, and is cut off FLOOD_ABORT later without seeing why).
    async with connect(server.url, ping_interval=None, max_queue=None) as flooder:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(within(20)):
                while True:
                    for _ in range(200):
                        if kind == "ping":
                            await flooder.ping()
                        else:
                            await flooder.send("x")
                    await asyncio.sleep(0)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        assert "too many" in closed.value.rcvd.reason
        if kind == "ping":  # the budget of pings and pongs is the first one crossed
            assert "pings and pongs" in closed.value.rcvd.reason
        assert loop.time() - started < within(15)
    assert (await honest.add(2, "still-here"))["type"] == "ack"
    await honest.close()
    assert server.event("conn.flood")["limit"] > 0


async def flood_until_closed(url: str, source: str) -> int | None:
    """Pings from ``source`` as fast as websockets sends them, until the server closes
    the connection; the close code it sent."""
    options: dict[str, Any] = {"local_addr": (source, 0)}
    async with connect(url, ping_interval=None, max_queue=None, **options) as flooder:
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(within(20)):
                while True:
                    for _ in range(200):
                        await flooder.ping()
                    await asyncio.sleep(0)
    return None if closed.value.rcvd is None else closed.value.rcvd.code


async def test_an_address_that_flooded_waits_before_connecting_again(
    make_server: ServerFactory,
) -> None:
    # Only the flooding address waits (127.0.0.2: all of 127/8 is loopback); others do not.
    server = await make_server(memory=True, flood_ban=within(1))
    attacker: dict[str, Any] = {"local_addr": ("127.0.0.2", 0)}
    assert await flood_until_closed(server.url, "127.0.0.2") == 1008
    with pytest.raises(InvalidStatus) as refused:
        await connect(server.url, open_timeout=within(5), **attacker)
    response = refused.value.response
    assert response.status_code == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 2
    assert b"this address flooded" in response.body
    async with connect(server.url) as other:  # 127.0.0.1 is not refused
        await other.send("3")
        assert await other.recv() == "Server records total=3"
    # Once the ban is over, the address connects again; a second flood doubles the ban.
    await asyncio.sleep(within(1))
    assert await flood_until_closed(server.url, "127.0.0.2") == 1008
    await asyncio.sleep(within(1))  # half of the second ban
    with pytest.raises(InvalidStatus):
        await connect(server.url, open_timeout=within(5), **attacker)
    await asyncio.sleep(within(1.2))
    async with connect(server.url, **attacker) as again:
        await again.send("4")
        assert await again.recv() == "Server records total=7"


async def test_flood_ban_0_lets_a_flooder_straight_back(
    serve: Callable[..., ServeProcess],
) -> None:
    # Behind a proxy every client has the proxy's address: there, no address is banned.
    server = serve("--memory", "--port", "0", "--flood-ban", "0")
    assert await flood_until_closed(server.url, "127.0.0.2") == 1008
    options: dict[str, Any] = {"local_addr": ("127.0.0.2", 0)}
    async with connect(server.url, **options) as again:
        await again.send("5")
        assert await again.recv() == "Server records total=5"
    assert server.event("conn.flood")["ban_s"] == 0


def test_penalties_double_and_are_forgotten() -> None:
    from wstally.penalty import FORGET_AFTER, MAX_BAN, Penalties

    box = Penalties(first=1.0)
    assert box.refused_for("a", 0.0) == 0.0
    assert [box.strike("a", t) for t in (0.0, 1.0, 3.0)] == [1.0, 2.0, 4.0]
    assert box.refused_for("a", 5.0) == 2.0
    assert box.refused_for("b", 5.0) == 0.0
    assert max(box.strike("a", 10.0 + n) for n in range(20)) == MAX_BAN
    assert box.strike("a", 100.0 + MAX_BAN + FORGET_AFTER + 1) == 1.0


# 6. SIGTERM answers every add it read.


async def test_sigterm_answers_every_add_read(serve: Callable[..., ServeProcess]) -> None:
    # No frame budget: these clients send as fast as they can, and a server that reads a
    # backlog of more than 20,000 frames in a second (after a stall of a loaded machine)
    # closes the connection for flooding, with the acks of what it read still to come.
    server = serve("--port", "0", "--db", "t.db", "--frame-limit", "0")
    url = server.url
    sent: dict[int, int] = {}
    answered: dict[int, int] = {}

    async def stream(i: int) -> None:
        async with connect(url, subprotocols=[SUBPROTOCOL]) as ws:
            await ws.send(json.dumps({"type": "hello", "client": f"s{i}"}))

            async def reader() -> None:
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame["type"] in ("ack", "error"):
                        answered[i] = answered.get(i, 0) + 1

            task = asyncio.create_task(reader())
            n = 0
            try:
                while True:
                    await ws.send(f'{{"type":"add","delta":1,"id":"{n}"}}')
                    n += 1
                    sent[i] = n
                    if n % 50 == 0:
                        await asyncio.sleep(0.001)
            except ConnectionClosed:
                pass
            await task

    streams = [asyncio.create_task(stream(i)) for i in range(4)]
    await asyncio.sleep(within(1))
    server.proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), within(20))
    assert server.wait() == 0
    stopping = server.event("server.stopping")
    assert stopping is not None
    # What the server read, it answered: the rest is still in the client's socket or in
    # flight, and a client learns that from the close (its outbox resends them).
    closed = [e for e in server.events if e.get("event") == "conn.closed"]
    read = sum(e["messages_in"] for e in closed)
    assert sum(answered.values()) == read - 4  # every frame read but the hellos
    assert sum(answered.values()) <= sum(sent.values())


# 10. Signals, file descriptors and HTTP requests websockets would drop unanswered.


async def test_sighup_reopens_the_log_file_and_keeps_serving(
    serve: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    log_file = tmp_path / "a.log"
    server = serve("--memory", "--port", "0", "--log-file", str(log_file))
    client = await JsonClient.connect(server.url)
    log_file.rename(tmp_path / "a.log.1")  # what logrotate does
    server.proc.send_signal(signal.SIGHUP)
    async with asyncio.timeout(within(5)):
        while not log_file.exists():  # noqa: ASYNC110 - another process's file
            await asyncio.sleep(0.02)
    assert (await client.add(4, "after-hup"))["type"] == "ack"
    await client.close()
    assert server.stop() == 0
    assert "server.logs_reopened" in log_file.read_text()
    assert "server.stopped" in log_file.read_text()
    assert "server.started" in (tmp_path / "a.log.1").read_text()


async def test_out_of_file_descriptors_is_a_logged_503(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path, "--memory", "--port", "0", nofile=FD_RESERVE + 20)
    try:
        assert server.port
        assert server.event("server.fd_limit")["capacity"] == 20
        held = [await connect(server.url) for _ in range(20)]
        for _ in range(5):
            status, body = await handshake(server.port)
            assert status == 503
            assert b"20 clients connected" in body
        assert server.health()["clients"] == 20
        await held.pop().close()
        async with connect(server.url) as again:
            await again.send("1")
            assert await again.recv() == "Server records total=1"
        for ws in held:
            await ws.close()
        server.stop()
        full = server.event("server.full")
        assert full["capacity"] == 20
        assert full["fd_bound"] is True
    finally:
        server.close()


async def raw_http(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), within(5))
    writer.close()
    return answer


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"405"),
        (b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
        (b"GET /healthz HTTP/1.1\nHost: x\n\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\nAccept: */*\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n", b"200"),
    ],
)
async def test_requests_websockets_would_drop_get_an_answer(
    make_server: ServerFactory, request_bytes: bytes, status: bytes
) -> None:
    server = await make_server(memory=True)
    answer = await raw_http(server.port, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status), answer
    assert answer.count(b"HTTP/1.1 ") == 1
    # And the server still serves.
    assert (await raw_http(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")).startswith(
        b"HTTP/1.1 200"
    )


async def test_a_sender_held_back_by_the_flow_gate_is_not_timed_out(
    make_server: ServerFactory,
) -> None:
    # Its pong waits behind adds the server does not read: that is not a dead peer.
    store = GatedStore()
    server = await make_server(
        store=store, rate_limit=0, frame_limit=0, ping_interval=0.2, ping_timeout=0.5
    )
    store.gate.clear()
    # max_queue=None: once the gate opens, 36,000 acks come back; the client reads them all
    # at once, so that its pong (behind them) is not held up by its own receive queue.
    async with connect(
        server.url, subprotocols=[SUBPROTOCOL], ping_interval=None, max_queue=None
    ) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "hello", "client": "held"}))
        count = FLOW_HIGH + 20_000

        async def blast() -> None:
            for n in range(count):
                await ws.send(f'{{"type":"add","delta":1,"id":"{n}"}}')

        sending = asyncio.create_task(blast())
        async with asyncio.timeout(within(30)):
            while not server.flow.blocked:  # noqa: ASYNC110 - polled server state
                await asyncio.sleep(0.01)
        await asyncio.sleep(within(2.5))  # five ping timeouts with the gate shut
        store.gate.set()
        acks = 0
        async with asyncio.timeout(within(60)):
            while acks < count:
                frame = json.loads(await ws.recv())
                if frame["type"] == "ack":
                    acks += 1
                assert frame["type"] != "error", frame
        await sending
    assert server.position.seq == count


async def test_a_peer_that_answers_nothing_is_still_timed_out(make_server: ServerFactory) -> None:
    server = await make_server(memory=True, ping_interval=0.1, ping_timeout=0.2, close_timeout=0.5)
    ws = await connect(server.url, ping_interval=None)
    ws.transport.pause_reading()  # no pong, and nothing else, ever
    async with asyncio.timeout(within(5)):
        while server.hub.clients:  # noqa: ASYNC110 - polled server state
            await asyncio.sleep(0.05)
    ws.transport.abort()
