"""End-to-end behaviour of the server over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from helpers import GatedStore, JsonClient, OpenClient, ServerFactory, http_get, within
from wstally.connection import TallyConnection
from wstally.peer import Peer
from wstally.server import TallyServer
from wstally.store import SQLiteStore
from wstally.tally import INT64_MAX, INT64_MIN


async def plain_lines(ws: Any, count: int) -> list[str]:
    return [await asyncio.wait_for(ws.recv(), within(5)) for _ in range(count)]


async def test_every_client_sees_every_update_in_the_same_order(
    server: TallyServer, clients: list[JsonClient], open_client: OpenClient
) -> None:
    for name in ("ann", "bob", "cy"):
        await open_client(server.url, {"client": name, "name": name})
    async with connect(server.url) as plain:
        per_client = 40

        async def json_sender(client: JsonClient, name: str) -> None:
            for i in range(per_client):
                await client.send({"type": "add", "delta": i + 1, "id": f"{name}-{i}"})

        async def plain_sender() -> None:
            for i in range(per_client):
                await plain.send(str(-i))

        await asyncio.gather(
            *(json_sender(c, n) for c, n in zip(clients, ("ann", "bob", "cy"), strict=True)),
            plain_sender(),
        )
        last = 4 * per_client
        seen = [await c.items_until(last) for c in clients]
        lines = await plain_lines(plain, last)

    assert seen[0] == seen[1] == seen[2]
    items = seen[0]
    assert [i["seq"] for i in items] == list(range(1, last + 1))
    running = 0
    for item in items:
        running += item["delta"]
        assert item["total"] == running
    expected_total = 3 * sum(range(1, per_client + 1)) - sum(range(per_client))
    assert running == expected_total
    assert lines == [f"Server records total={i['total']}" for i in items]
    assert {i["by"] for i in items} == {"ann", "bob", "cy", None}
    # Each JSON client got an ack for each of its own adds, after... nothing else needed.
    for client in clients:
        acks = [f for f in client.frames if f["type"] == "ack"]
        assert len(acks) == per_client
        assert all(not a.get("duplicate") for a in acks)
    # Frames never overlap or leave gaps.
    for client in clients:
        frames = [f for f in client.frames if f["type"] == "updates"]
        previous = 0
        for frame in frames:
            assert frame["items"][0]["seq"] == previous + 1
            assert (frame["seq"], frame["total"]) == (
                frame["items"][-1]["seq"],
                frame["items"][-1]["total"],
            )
            previous = frame["seq"]


async def test_plain_client_sees_json_update_and_vice_versa(
    server: TallyServer, open_client: OpenClient
) -> None:
    json_client = await open_client(server.url)
    async with connect(server.url) as plain:
        await plain.send("5")
        assert (
            await asyncio.wait_for(plain.recv(decode=True), within(5)) == "Server records total=5"
        )
        update = await json_client.expect("updates")
        assert update["items"] == [{"seq": 1, "delta": 5, "total": 5, "by": None}]
        await json_client.send({"type": "add", "delta": -3})
        assert (
            await asyncio.wait_for(plain.recv(decode=True), within(5)) == "Server records total=2"
        )


async def test_plain_client_gets_no_greeting(server: TallyServer) -> None:
    async with connect(server.url) as plain:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(plain.recv(), within(0.3))


async def test_ack_is_sent_only_after_the_commit(
    make_server: ServerFactory, open_client: OpenClient
) -> None:
    store = GatedStore()
    server = await make_server(store=store)
    client = await open_client(server.url)
    store.gate.clear()
    await client.send({"type": "add", "delta": 7, "id": "a"})
    with pytest.raises(TimeoutError):
        await client.expect("ack", timeout=within(0.5))
    _, _, body = await http_get(server.port, "/healthz")
    assert json.loads(body)["total"] == 0  # applied in memory, but not yet published
    store.gate.set()
    ack = await client.expect("ack")
    assert ack == {"type": "ack", "id": "a", "seq": 1, "total": 7}
    assert store.commits == [1]
    update = await client.expect("updates")
    assert update["total"] == 7


async def test_duplicate_of_a_pending_add_is_answered_after_the_commit(
    make_server: ServerFactory, open_client: OpenClient
) -> None:
    store = GatedStore()
    server = await make_server(store=store)
    client = await open_client(server.url, {"client": "c1"})
    store.gate.clear()
    await client.send({"type": "add", "delta": 7, "id": "a"})
    await client.send({"type": "add", "delta": 7, "id": "a"})
    with pytest.raises(TimeoutError):
        await client.expect("ack", timeout=within(0.3))
    store.gate.set()
    acks = [await client.expect("ack"), None]
    while acks[1] is None:
        frame = await client.recv()
        if frame["type"] == "ack":
            acks[1] = frame
    assert acks == [
        {"type": "ack", "id": "a", "seq": 1, "total": 7},
        {"type": "ack", "id": "a", "seq": 1, "total": 7, "duplicate": True},
    ]
    assert server.position.total == 7


async def test_duplicate_id_is_not_applied_again(
    server: TallyServer, open_client: OpenClient
) -> None:
    client = await open_client(server.url, {"client": "me", "name": "me"})
    first = await client.add(10, "x")
    again = await client.add(10, "x")
    assert first == {"type": "ack", "id": "x", "seq": 1, "total": 10}
    assert again == {**first, "duplicate": True}
    third = await client.add(1, "y")
    assert third["seq"] == 2
    assert third["total"] == 11


async def test_adds_are_taken_straight_off_the_wire_and_the_rest_is_not(
    server: TallyServer, open_client: OpenClient
) -> None:
    # The common frame skips websockets' parser and queue (connection.py, wire.py): if a
    # websockets release moved what that relies on, adds would quietly take the slow path.
    client = await open_client(server.url, {"client": "me", "name": "me"})
    for n in range(20):
        assert (await client.add(1, f"a{n}"))["seq"] == n + 1
    await client.send({"type": "add", "delta": "x", "id": "bad"})
    assert (await client.expect("error"))["code"] == "bad_delta"
    assert (await client.add(1, "x"))["total"] == 21
    assert server.handler.taken >= 19  # the first may come before the handler waits
    (peer,) = server.hub.peers
    assert isinstance(peer.ws, TallyConnection)
    assert peer.ws.intake.split > 0


async def test_ids_are_scoped_by_client_or_by_connection(
    server: TallyServer, open_client: OpenClient
) -> None:
    a = await open_client(server.url, {"client": "A"})
    b = await open_client(server.url, {"client": "B"})
    anon1 = await open_client(server.url)
    anon2 = await open_client(server.url)
    acks = [await c.add(1, "same") for c in (a, b, anon1, anon2)]
    assert [ack["seq"] for ack in acks] == [1, 2, 3, 4]
    assert not any(ack.get("duplicate") for ack in acks)
    # The same hello client on a new connection is the same scope: a resend is a duplicate.
    a_again = await open_client(server.url, {"client": "A"})
    assert (await a_again.add(1, "same"))["duplicate"] is True
    assert server.position.total == 4


async def test_total_seq_epoch_and_ids_survive_a_restart(
    make_server: ServerFactory, tmp_path: Any
) -> None:
    db = str(tmp_path / "restart.db")
    first = await make_server(store=SQLiteStore(db))
    client = await JsonClient.connect(first.url, {"client": "keeper"})
    for i in range(5):
        await client.add(i + 1, f"id-{i}")
    snapshot_before = client.snapshot
    await client.close()
    await first.stop()

    second = await make_server(store=SQLiteStore(db))
    client = await JsonClient.connect(second.url, {"client": "keeper"})
    try:
        snap = client.snapshot
        assert snap["epoch"] == snapshot_before["epoch"]
        assert (snap["seq"], snap["total"]) == (5, 15)
        resent = await client.add(3, "id-2")
        assert resent == {"type": "ack", "id": "id-2", "seq": 3, "total": 6, "duplicate": True}
        fresh = await client.add(100, "id-new")
        assert (fresh["seq"], fresh["total"]) == (6, 115)
    finally:
        await client.close()


async def test_memory_store_gets_a_new_epoch_each_start(make_server: ServerFactory) -> None:
    one = await make_server(memory=True)
    two = await make_server(memory=True)
    assert one.position.epoch != two.position.epoch


JSON_BAD_INPUTS: list[tuple[str, str]] = [
    ("not json", "bad_json"),
    ('{"type":"add","delta":1', "bad_json"),
    ('{"type":"add","delta":NaN}', "bad_json"),
    ('{"type":"add","delta":1,"delta":2}', "bad_json"),
    ("[" * 2000 + "]" * 2000, "bad_json"),
    ("[1,2]", "bad_message"),
    ("42", "bad_message"),
    ('{"delta":1}', "bad_message"),
    ('{"type":5}', "bad_message"),
    ('{"type":"subtract","delta":1}', "unknown_type"),
    ('{"type":"add","delta":1.0}', "bad_delta"),
    ('{"type":"add","delta":1e3}', "bad_delta"),
    ('{"type":"add","delta":true}', "bad_delta"),
    ('{"type":"add","delta":"5"}', "bad_delta"),
    ('{"type":"add","delta":null}', "bad_delta"),
    ('{"type":"add"}', "bad_delta"),
    ('{"type":"add","delta":9223372036854775808}', "bad_delta"),
    ('{"type":"add","delta":-9223372036854775809}', "bad_delta"),
    ('{"type":"add","delta":1,"id":7}', "bad_id"),
    ('{"type":"add","delta":1,"id":""}', "bad_id"),
    ('{"type":"add","delta":1,"id":"' + "x" * 65 + '"}', "bad_id"),
    ('{"type":"hello","client":"c","name":"\\u001b[2J"}', "bad_name"),
    ('{"type":"hello","client":"c","name":"' + "n" * 33 + '"}', "bad_name"),
    ('{"type":"hello","client":""}', "bad_client"),
    ('{"type":"hello","client":5}', "bad_client"),
]


@pytest.mark.parametrize(("frame", "code"), JSON_BAD_INPUTS)
async def test_bad_json_input_gets_its_code_and_changes_nothing(
    server: TallyServer, open_client: OpenClient, frame: str, code: str
) -> None:
    client = await open_client(server.url)
    await client.add(5, "before")
    await client.ws.send(frame)
    error = await client.expect("error")
    assert error["code"] == code
    assert error["message"]
    # The connection still works and the total is unchanged.
    after = await client.add(0, "after")
    assert (after["seq"], after["total"]) == (2, 5)


async def test_error_names_the_refused_id(server: TallyServer, open_client: OpenClient) -> None:
    client = await open_client(server.url)
    error = await client.add(1.5, "f1")  # type: ignore[arg-type]
    assert error == {
        "type": "error",
        "code": "bad_delta",
        "message": "'delta' must be a JSON integer, not a float",
        "id": "f1",
    }


async def test_hello_is_only_allowed_first(server: TallyServer, open_client: OpenClient) -> None:
    client = await open_client(server.url)
    await client.add(1, "a")
    await client.send({"type": "hello", "client": "late"})
    assert (await client.expect("error"))["code"] == "hello_late"
    greeted = await open_client(server.url, {"client": "c", "name": "n"})
    await greeted.send({"type": "hello", "client": "c2"})
    assert (await greeted.expect("error"))["code"] == "hello_late"
    # A refused hello does not count: the corrected one is accepted.
    retry = await open_client(server.url, {"client": "r", "name": "\x1b[2J"})
    assert (await retry.expect("error"))["code"] == "bad_name"
    await retry.send({"type": "hello", "client": "r", "name": "fixed"})
    await retry.add(0, "z")
    assert (await retry.expect("updates"))["items"][-1]["by"] == "fixed"
    ack = await greeted.add(1, "b")
    assert ack["total"] == 2
    update = await greeted.expect("updates")
    assert update["items"][-1]["by"] == "n"


async def test_binary_frames_are_refused_in_both_modes(
    server: TallyServer, open_client: OpenClient
) -> None:
    client = await open_client(server.url)
    await client.ws.send(b"5")
    assert (await client.expect("error"))["code"] == "binary_unsupported"
    async with connect(server.url) as plain:
        await plain.send(b"5")
        reply = await asyncio.wait_for(plain.recv(decode=True), within(5))
        assert reply == "error: binary frames are not supported; send text"
    assert server.position.total == 0


PLAIN_BAD_INPUTS = [
    ("1_000", "not an integer"),
    ("0x10", "not an integer"),
    ("1e3", "not an integer"),
    ("١٢", "not an integer"),
    ("NaN", "not an integer"),
    ("", "empty message"),
    ("   ", "empty message"),
    ("+-1", "not an integer"),
    ("1 2", "not an integer"),
    ("5" * 5000, "too long"),
    ("9223372036854775808", "outside the signed 64-bit range"),
    ("\x1b[2J", "not an integer"),
]


@pytest.mark.parametrize(("text", "reason"), PLAIN_BAD_INPUTS)
async def test_bad_plain_input_gets_an_error_and_changes_nothing(
    server: TallyServer, text: str, reason: str
) -> None:
    async with connect(server.url) as plain, connect(server.url) as other:
        await plain.send("4")
        assert (
            await asyncio.wait_for(plain.recv(decode=True), within(5)) == "Server records total=4"
        )
        assert (
            await asyncio.wait_for(other.recv(decode=True), within(5)) == "Server records total=4"
        )
        await plain.send(text)
        reply = await asyncio.wait_for(plain.recv(decode=True), within(5))
        assert isinstance(reply, str)
        assert reply.startswith("error: ")
        assert reason in reply
        assert "\x1b" not in reply
        await plain.send(" +1 ")
        assert (
            await asyncio.wait_for(plain.recv(decode=True), within(5)) == "Server records total=5"
        )
        # The other client saw only the valid update: errors go to their sender alone.
        assert (
            await asyncio.wait_for(other.recv(decode=True), within(5)) == "Server records total=5"
        )


@pytest.mark.parametrize("text", ["5", "-3", " +12 ", "\t7\n", "007"])
async def test_plain_numbers_are_accepted(server: TallyServer, text: str) -> None:
    async with connect(server.url) as plain:
        await plain.send(text)
        expected = int(text.strip())
        reply = await asyncio.wait_for(plain.recv(decode=True), within(5))
        assert reply == f"Server records total={expected}"


async def test_int64_edges(server: TallyServer, open_client: OpenClient) -> None:
    client = await open_client(server.url)
    assert (await client.add(INT64_MAX, "max"))["total"] == INT64_MAX
    over = await client.add(1, "over")
    assert (over["type"], over["code"], over["id"]) == ("error", "overflow", "over")
    assert (await client.add(-INT64_MAX, "back"))["total"] == 0
    assert (await client.add(INT64_MIN, "min"))["total"] == INT64_MIN
    under = await client.add(-1, "under")
    assert under["code"] == "overflow"
    async with connect(server.url) as plain:
        await plain.send("-1")
        # A broadcast still on its way from before it connected may come first.
        reply = await asyncio.wait_for(plain.recv(decode=True), within(5))
        while reply.startswith("Server records total="):
            reply = await asyncio.wait_for(plain.recv(decode=True), within(5))
        assert reply.startswith("error: ")
        assert "64-bit" in reply
    assert server.position.total == INT64_MIN
    assert server.position.seq == 3


async def test_oversized_frame_closes_with_1009(
    server: TallyServer, open_client: OpenClient
) -> None:
    client = await open_client(server.url)
    await client.ws.send(json.dumps({"type": "add", "delta": 1, "pad": "x" * 9000}))
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await client.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009
    assert server.position.total == 0


async def test_invalid_utf8_closes_with_1007(server: TallyServer) -> None:
    async with connect(server.url) as plain:
        # Bypass the client's own encoding to put invalid UTF-8 in a text frame.
        plain.protocol.send_text(b"\xff\xfe5")
        plain.send_data()
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(plain.recv(decode=True), within(5))
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1007
    assert server.position.total == 0


async def test_unknown_subprotocol_is_refused_with_http_400(server: TallyServer) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(server.url, subprotocols=["chat"])  # type: ignore[list-item]
    assert refused.value.response.status_code == 400
    assert b"wstally.v1" in refused.value.response.body


async def test_healthz_and_other_paths(server: TallyServer) -> None:
    async with connect(server.url) as plain:
        await plain.send("42")
        await asyncio.wait_for(plain.recv(decode=True), within(5))
        status, headers, body = await http_get(server.port, "/healthz")
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == {
            "status": "ok",
            "seq": 1,
            "total": 42,
            "clients": 1,
            "epoch": server.position.epoch,
            "lagging": 0,
            "evicted": 0,
            "engine": {"engine": "memory", "store": "memory"},
        }
    status, _, _ = await http_get(server.port, "/nope")
    assert status == 404
    status, headers, _ = await http_get(server.port, "/")
    assert status == 200  # the live page (see test_web.py)
    assert headers["content-type"].startswith("text/html")
    with pytest.raises(InvalidStatus) as refused:
        await connect(server.url + "elsewhere")
    assert refused.value.response.status_code == 404


async def test_presence_follows_joins_and_leaves(
    server: TallyServer, open_client: OpenClient
) -> None:
    first = await open_client(server.url)
    assert first.snapshot["clients"] == 1
    second = await JsonClient.connect(server.url)
    assert second.snapshot["clients"] == 2
    assert (await first.expect("presence"))["clients"] == 2
    await second.close()
    assert (await first.expect("presence"))["clients"] == 1


async def test_commit_failure_tells_no_one_and_keeps_the_total(
    make_server: ServerFactory, open_client: OpenClient
) -> None:
    store = GatedStore()
    server = await make_server(store=store)
    client = await open_client(server.url)
    watcher = await open_client(server.url)
    assert (await client.add(10, "ok"))["total"] == 10
    store.fail = True
    refused = await client.add(5, "lost")
    assert refused["code"] == "store_failed"
    assert refused["id"] == "lost"
    assert server.position.total == 10
    store.fail = False
    ack = await client.add(1, "next")
    assert (ack["seq"], ack["total"]) == (2, 11)
    items = await watcher.items_until(2)
    assert [(i["seq"], i["total"]) for i in items] == [(1, 10), (2, 11)]


async def slow_reader(
    server: TallyServer, max_queue: int | None
) -> tuple[ClientConnection, Peer, JsonClient]:
    """A JSON reader with tiny socket buffers on both ends (it fills them fast once it stops
    reading), its peer on the server, and a sender."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    slow = await connect(
        server.url,
        sock=sock,
        subprotocols=["wstally.v1"],  # type: ignore[list-item]
        max_queue=max_queue,
    )
    sender = await JsonClient.connect(server.url, {"client": "s", "name": "n" * 32})
    peer = next(p for p in server.hub.peers if p.ws.subprotocol == "wstally.v1" and not p.client)
    peer.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return slow, peer, sender


async def send_until_lagging(peer: Peer, sender: JsonClient) -> tuple[int, int]:
    """Adds, 100 at a time, until ``peer`` lags and 2,000 were sent: how many, and the most
    its write buffer held meanwhile."""
    peak = sent = 0
    async with asyncio.timeout(within(20)):
        while peer.lagged == 0 or sent < 2000:
            for _ in range(100):
                await sender.send({"type": "add", "delta": 1})
            sent += 100
            await sender.items_until(sent)
            peak = max(peak, peer.ws.transport.get_write_buffer_size())
    assert peer.lagging
    return sent, peak


async def test_slow_reader_is_skipped_then_resynced(make_server: ServerFactory) -> None:
    limit = 8 * 1024
    server = await make_server(memory=True, buffer_limit=limit)
    # A reader with tiny socket buffers on both ends that stops reading: the server's write
    # buffer for it must stop growing at about the limit, and it must get the news once it
    # reads again.
    slow, peer, sender = await slow_reader(server, max_queue=1)
    sent, peak = await send_until_lagging(peer, sender)
    # Bounded: the limit plus at most one tick's frames, never the whole backlog.
    assert peak < limit + 16 * 1024
    # Now read everything: the stream must end on a snapshot at the current position.
    last: dict[str, Any] = {}
    async with asyncio.timeout(within(10)):
        while last.get("type") != "snapshot" or last.get("seq") != sent:
            last = json.loads(await slow.recv())
    assert last["total"] == sent
    assert server.hub.lagging == {}
    # And live updates continue from there without a gap.
    await sender.send({"type": "add", "delta": 1})
    nxt: dict[str, Any] = json.loads(await asyncio.wait_for(slow.recv(), within(5)))
    while nxt["type"] != "updates":
        nxt = json.loads(await asyncio.wait_for(slow.recv(), within(5)))
    assert nxt["items"][0]["seq"] == sent + 1
    await slow.close()


async def test_a_slow_reader_at_shutdown_gets_the_final_position_without_a_gap(
    make_server: ServerFactory,
) -> None:
    # A connection that lags when the server stops is resumed for the close. It must be
    # told the position first (a snapshot), not written the rest of the stream from where
    # it fell behind: its stream would have a gap, and end short of the last update.
    server = await make_server(memory=True, buffer_limit=8 * 1024)
    slow, peer, sender = await slow_reader(server, max_queue=None)
    slow.transport.pause_reading()  # until the server stops
    sent, _ = await send_until_lagging(peer, sender)
    stopping = asyncio.create_task(server.stop())
    async with asyncio.timeout(within(5)):
        while peer.lagging:  # noqa: ASYNC110 - polled server state
            await asyncio.sleep(0.001)
    slow.transport.resume_reading()
    frames: list[dict[str, Any]] = []
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(within(10)):
            while True:
                frames.append(json.loads(await slow.recv()))
    await stopping
    seq = frames[0]["seq"]  # its first snapshot
    for frame in frames[1:]:
        if frame["type"] == "snapshot":
            seq = frame["seq"]
        elif frame["type"] == "updates":
            assert frame["items"][0]["seq"] == seq + 1, (seq, frame["items"][0])
            seq = frame["seq"]
    assert (seq, server.hub.seq) == (sent, sent)
    await sender.close()
