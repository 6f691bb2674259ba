"""Floods and slow consumers: one client's excess never costs the others."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from helpers import OpenClient, ServerFactory, within


async def test_a_flooder_is_rate_limited_and_others_are_unaffected(
    make_server: ServerFactory, open_client: OpenClient
) -> None:
    server = await make_server(memory=True, rate_limit=200)
    flooder = await open_client(server.url, {"client": "flood"})
    polite = await open_client(server.url, {"client": "polite"})
    count = 3000
    # As fast as the socket takes them, without waiting for a single answer.
    await asyncio.gather(
        *(flooder.send({"type": "add", "delta": i % 7 - 3, "id": str(i)}) for i in range(count))
    )
    started = time.monotonic()
    for i in range(10):
        ack = await polite.add(1, f"p{i}")
        assert ack["type"] == "ack"
    polite_seconds = time.monotonic() - started
    answers: dict[str, dict[str, Any]] = {}
    async with asyncio.timeout(within(20)):
        while len(answers) < count:
            frame = await flooder.recv()
            if frame["type"] in ("ack", "error"):
                answers[frame["id"]] = frame
    acked = [int(i) for i, a in answers.items() if a["type"] == "ack"]
    limited = [a for a in answers.values() if a["type"] == "error"]
    assert all(a["code"] == "rate_limited" for a in limited)
    assert 150 <= len(acked) < count / 2  # about a second's burst, then the refill
    assert polite_seconds < within(2)
    # Nothing the flooder was told was applied is missing, and nothing else was applied.
    expected = sum(i % 7 - 3 for i in acked) + 10
    assert server.position.total == expected
    assert server.position.seq == len(acked) + 10


async def test_plain_flooders_get_a_readable_refusal(make_server: ServerFactory) -> None:
    from websockets.asyncio.client import connect

    server = await make_server(memory=True, rate_limit=5)
    async with connect(server.url) as ws:
        for _ in range(20):
            await ws.send("1")
        replies = [await asyncio.wait_for(ws.recv(), within(5)) for _ in range(20)]
    refused = [r for r in replies if str(r).startswith("error: too many adds")]
    assert len(refused) >= 14
    assert server.position.total == 20 - len(refused)
    assert json.dumps(replies)  # text frames only


async def test_a_reader_that_stays_behind_is_evicted_and_others_keep_up(
    make_server: ServerFactory, open_client: OpenClient
) -> None:
    import socket

    from websockets.asyncio.client import connect

    server = await make_server(memory=True, buffer_limit=8 * 1024, slow_timeout=0.5)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    stuck = await connect(server.url, sock=sock, max_queue=1)  # and never reads again
    watcher = await open_client(server.url)
    sender = await open_client(server.url, {"client": "s", "name": "n" * 32})
    peer = next(p for p in server.hub.peers if p.mode.value == "plain")
    peer.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = 0
    async with asyncio.timeout(within(20)):
        while peer in server.hub.peers:
            for _ in range(100):
                await sender.send({"type": "add", "delta": 1})
            sent += 100
            await watcher.items_until(sent)
            await asyncio.sleep(0.01)
    assert server.hub.evicted == 1
    assert peer.lagged >= 1
    # The watcher that kept reading saw every update, in order, while this happened.
    assert [i["seq"] for i in watcher.items()] == list(range(1, sent + 1))
    # Neither the stuck client nor the sender (which never read its broadcasts) would
    # complete a closing handshake quickly: drop them.
    stuck.transport.abort()
    sender.ws.transport.abort()
