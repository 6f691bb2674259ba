"""Several nodes, one total: real nodes on one real redis-server (AOF always)."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from helpers import JsonClient, OpenClient, ServerFactory, within
from redisproc import RedisServer
from servers import ServeProcess
from wstally.protocol import SUBPROTOCOL
from wstally.server import TallyServer

Nodes = Callable[..., Any]


@pytest.fixture
async def nodes(redis_server: RedisServer, make_server: ServerFactory) -> Nodes:
    # Redis first, so that it is stopped last: nodes stop while Redis still answers.
    async def start(count: int, **options: Any) -> list[TallyServer]:
        return [
            await make_server(redis=redis_server.url, node=f"n{i}", **options) for i in range(count)
        ]

    return start


def gapless(items: list[dict[str, Any]], first: int = 1) -> None:
    assert [i["seq"] for i in items] == list(range(first, first + len(items)))
    for before, after in itertools.pairwise(items):
        assert after["total"] == before["total"] + after["delta"]


async def test_every_watcher_on_every_node_sees_one_order(
    nodes: Nodes, open_client: OpenClient
) -> None:
    servers = await nodes(3)
    watchers = [await open_client(s.url) for s in servers]
    plain = [await connect(s.url) for s in servers]
    senders = [
        await open_client(s.url, {"client": f"c{i}", "name": f"w{i}"})
        for i, s in enumerate(servers)
    ]

    async def send(i: int, sender: JsonClient) -> None:
        for n in range(40):
            await sender.send({"type": "add", "delta": i * 100 + n, "id": str(n)})

    await asyncio.gather(*(send(i, s) for i, s in enumerate(senders)))
    seen = [await w.items_until(120, within(15)) for w in watchers]
    gapless(seen[0])
    assert seen[0] == seen[1] == seen[2]
    assert sorted(i["by"] for i in seen[0]) == sorted(["w0", "w1", "w2"] * 40)
    total = seen[0][-1]["total"]
    # Plain clients everywhere follow the same totals, in the same order.
    for ws in plain:
        lines: list[str | bytes] = []
        while len(lines) < 120:
            lines.append(await asyncio.wait_for(ws.recv(), within(5)))
        assert lines == [f"Server records total={i['total']}" for i in seen[0]]
        await ws.close()
    for s in servers:
        health = s.position
        assert (health.seq, health.total) == (120, total)
    for sender in senders:
        # They never read their acks: websockets' queue is full, the close would time out.
        sender.ws.transport.abort()


async def test_a_resend_to_another_node_is_a_duplicate(
    nodes: Nodes, open_client: OpenClient
) -> None:
    one, two = await nodes(2)
    first = await open_client(one.url, {"client": "same"})
    ack = await first.add(7, "a-1")
    assert ack["type"] == "ack"
    await first.close()
    again = await open_client(two.url, {"client": "same"})
    dup = await again.add(7, "a-1")
    assert dup == {**ack, "duplicate": True}
    other = await open_client(two.url, {"client": "someone-else"})
    assert (await other.add(7, "a-1"))["seq"] == ack["seq"] + 1  # another client's id


async def test_recovery_on_another_node(nodes: Nodes, open_client: OpenClient) -> None:
    one, two = await nodes(2)
    writer = await open_client(one.url, {"client": "w"})
    for n in range(5):
        await writer.add(1, str(n))
    away = await JsonClient.connect(one.url, {"client": "r"})
    await away.items_until(5)
    epoch, seq = away.snapshot["epoch"], away.last_seq()
    await away.close()
    for n in range(5, 12):
        await writer.add(2, str(n))
    back = await open_client(two.url, {"client": "r", "since": seq, "epoch": epoch})
    assert back.snapshot["recovered"] is True
    items = back.items()
    assert [i["seq"] for i in items] == list(range(seq + 1, 13))
    gapless(items, seq + 1)


async def test_redis_restarted_empty_is_a_new_epoch(
    nodes: Nodes, redis_server: RedisServer, open_client: OpenClient
) -> None:
    one, two = await nodes(2)
    watcher = await open_client(two.url, {"client": "w"})
    writer = await open_client(one.url, {"client": "c"})
    for n in range(3):
        await writer.add(5, str(n))
    old_epoch = watcher.snapshot["epoch"]
    redis_server.restart_empty()
    # Every node notices; every JSON client hears of the new history, not recovered.
    snapshot = await watcher.expect("snapshot", within(20))
    assert snapshot["epoch"] != old_epoch
    assert snapshot["recovered"] is False
    assert (snapshot["seq"], snapshot["total"]) == (0, 0)
    async with asyncio.timeout(within(20)):
        while True:
            answer = await writer.add(1, "after")
            if answer["type"] == "ack":
                break
            assert answer["code"] == "unavailable"
            await asyncio.sleep(0.1)
    assert (answer["seq"], answer["total"]) == (1, 1)
    # A client returning with the old epoch is told so, on any node.
    back = await open_client(one.url, {"client": "x", "since": 3, "epoch": old_epoch})
    assert back.snapshot["recovered"] is False
    assert back.snapshot["epoch"] == snapshot["epoch"]


class Streamer:
    """A client that streams adds with ids and resends the unanswered ones on reconnect."""

    def __init__(self, name: str, total: int) -> None:
        self.name = name
        self.total = total
        self.acked: dict[str, tuple[int, int]] = {}
        self.refused: list[str] = []
        self.sent = 0

    async def run(self, urls: list[str], stop_after: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + stop_after
        attempt = 0
        while len(self.acked) < self.total and loop.time() < deadline:
            url = urls[attempt % len(urls)]
            attempt += 1
            try:
                async with connect(url, subprotocols=[SUBPROTOCOL], open_timeout=2) as ws:
                    await self._session(ws)
            except (OSError, ConnectionClosed, TimeoutError):
                await asyncio.sleep(0.05)

    async def _session(self, ws: ClientConnection) -> None:
        await ws.send(json.dumps({"type": "hello", "client": self.name}))
        receiving = asyncio.create_task(self._receive(ws))
        try:
            # Everything not acked yet, from the first: resends keep their ids.
            for n in range(self.total):
                if str(n) not in self.acked:
                    await ws.send(f'{{"type":"add","delta":1,"id":"{n}"}}')
                    self.sent += 1
                    if n % 20 == 0:
                        await asyncio.sleep(0.002)
            while len(self.acked) < self.total:
                await asyncio.sleep(0.05)
                if receiving.done():
                    return
                # Transient refusals (unavailable, store_failed...) are sent again.
                for req_id in self.refused:
                    await ws.send(f'{{"type":"add","delta":1,"id":"{req_id}"}}')
                self.refused.clear()
        finally:
            receiving.cancel()

    async def _receive(self, ws: ClientConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "ack":
                self.acked.setdefault(frame["id"], (frame["seq"], frame["total"]))
            elif frame["type"] == "error":
                self.refused.append(frame["id"])


async def test_a_node_killed_under_load_loses_nothing_acked(
    serve: Callable[..., ServeProcess], redis_server: RedisServer
) -> None:
    a = serve("--redis", redis_server.url, "--port", "0", "--node", "a")
    b = serve("--redis", redis_server.url, "--port", "0", "--node", "b")
    urls = [a.url, b.url]
    streamers = [Streamer(f"s{i}", 400) for i in range(4)]
    running = [asyncio.create_task(s.run(urls, within(60))) for s in streamers]
    await asyncio.sleep(within(0.5))
    a.proc.send_signal(signal.SIGKILL)  # mid-stream: some adds in flight, unanswered
    await asyncio.gather(*running)
    for s in streamers:
        assert len(s.acked) == s.total, (s.name, len(s.acked))
    seqs = sorted(seq for s in streamers for seq, _ in s.acked.values())
    # Each add counted once: 1,600 distinct seqs, 1..1600, and the total says the same.
    assert seqs == list(range(1, 1601))
    health = b.health()
    assert (health["seq"], health["total"]) == (1600, 1600)
    assert health["engine"]["engine"] == "redis"
    assert health["engine"]["node"] == "b"
    assert a.wait() == -signal.SIGKILL


async def test_redis_killed_and_restarted_under_load(
    nodes: Nodes, redis_server: RedisServer, clients: list[JsonClient]
) -> None:
    one, two = await nodes(2)
    watchers = [
        await JsonClient.connect(s.url, {"client": f"w{i}"}) for i, s in enumerate((one, two))
    ]
    clients.extend(watchers)
    streamers = [Streamer(f"s{i}", 300) for i in range(3)]
    running = [
        asyncio.create_task(s.run([one.url, two.url][i % 2 :], within(60)))
        for i, s in enumerate(streamers)
    ]
    await asyncio.sleep(within(0.3))
    redis_server.kill9()
    await asyncio.sleep(within(1.5))  # adds meanwhile: refused "unavailable", never acked
    assert one.engine.status()["redis"] == "disconnected"
    redis_server.restart()
    await asyncio.gather(*running)
    for s in streamers:
        assert len(s.acked) == s.total
    seqs = sorted(seq for s in streamers for seq, _ in s.acked.values())
    assert seqs == list(range(1, 901))
    # The watchers stayed connected and saw every update once, in order, with no gap.
    for watcher in watchers:
        items = await watcher.items_until(900, within(20))
        seen = [i for i in items if i["seq"] > watcher.snapshot["seq"]]
        gapless(seen, watcher.snapshot["seq"] + 1)
        assert seen[-1]["total"] == 900
    async with asyncio.timeout(within(5)):  # the feed's next read says so too
        while one.engine.status()["redis"] != "connected":  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_a_node_refuses_to_start_without_redis(tmp_path: Path) -> None:
    proc = ServeProcess(tmp_path, "--redis", "redis://127.0.0.1:1/0", "--port", "0")
    try:
        assert proc.wait() == 1
        assert "cannot open the redis engine" in "".join(proc.raw)
    finally:
        proc.close()
