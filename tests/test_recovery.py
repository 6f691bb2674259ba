"""Missed-update recovery: hello with since/epoch replays the gap, then goes live."""

from __future__ import annotations

import asyncio
from typing import Any

from helpers import JsonClient, OpenClient, ServerFactory, within
from wstally.server import TallyServer
from wstally.store import MemoryStore


async def seqs_until(client: JsonClient, last: int) -> list[dict[str, Any]]:
    """Every frame (updates and snapshots) until ``last`` has been seen live."""
    async with asyncio.timeout(within(20)):
        while True:
            frame = await client.recv()
            if frame["type"] == "updates" and frame["seq"] >= last:
                return client.frames


async def test_a_returning_client_gets_every_missed_update_then_live(
    make_server: ServerFactory, open_client: OpenClient
) -> None:
    server = await make_server()  # SQLite: the history is read from the audit trail
    writer = await open_client(server.url, {"client": "w"})
    away = await JsonClient.connect(server.url, {"client": "a"})
    for i in range(5):
        await writer.add(1, f"early-{i}")
    await away.items_until(5)
    epoch = away.snapshot["epoch"]
    await away.close()
    for i in range(50):
        await writer.add(i, f"missed-{i}")
    # While it recovers, others keep adding: the replay and the live feed must join exactly.
    back = await open_client(server.url, {"client": "a", "since": 5, "epoch": epoch})

    async def keep_adding() -> None:
        for _ in range(30):
            await writer.send({"type": "add", "delta": 1})

    adder = asyncio.create_task(keep_adding())
    frames = await seqs_until(back, 85)
    await adder
    replayed = [f for f in frames if f["type"] in ("updates", "snapshot")]
    confirm = [i for i, f in enumerate(replayed) if f.get("recovered") is True]
    assert len(confirm) == 1
    before, after = replayed[: confirm[0]], replayed[confirm[0] + 1 :]
    seqs = [item["seq"] for f in before if f["type"] == "updates" for item in f["items"]]
    snapshot = replayed[confirm[0]]
    assert seqs == list(range(6, snapshot["seq"] + 1))
    live = [item["seq"] for f in after for item in f["items"]]
    assert live == list(range(snapshot["seq"] + 1, 86))
    assert back.items()[-1]["total"] == server.position.total


async def test_recovers_ten_thousand_updates(server: TallyServer, open_client: OpenClient) -> None:
    writer = await open_client(server.url, {"client": "w"})
    epoch = writer.snapshot["epoch"]
    for start in range(0, 10_000, 500):
        for i in range(start, start + 500):
            await writer.send({"type": "add", "delta": 1, "id": str(i)})
        await writer.items_until(start + 500)
    back = await open_client(server.url, {"client": "b", "since": 0, "epoch": epoch})
    snapshot = back.snapshot  # connect() waited for the snapshot that ends the replay
    assert snapshot["recovered"] is True
    assert snapshot["seq"] == 10_000
    assert [i["seq"] for i in back.items()] == list(range(1, 10_001))


async def test_other_history_or_impossible_since_gets_a_plain_snapshot(
    server: TallyServer, open_client: OpenClient
) -> None:
    writer = await open_client(server.url)
    await writer.add(3, "x")
    for hello, reason in (
        ({"since": 0, "epoch": "another-history"}, "epoch changed"),
        ({"since": 99, "epoch": server.position.epoch}, "ahead"),
    ):
        client = await open_client(server.url, {"client": "c", **hello})
        snapshot = client.snapshot
        assert snapshot["recovered"] is False
        assert reason in snapshot["reason"]
        assert (snapshot["seq"], snapshot["total"]) == (1, 3)


async def test_history_no_longer_kept_gets_a_plain_snapshot(
    make_server: ServerFactory, open_client: OpenClient
) -> None:
    server = await make_server(store=MemoryStore(keep=10))
    writer = await open_client(server.url)
    for i in range(30):
        await writer.add(1, str(i))
    back = await open_client(
        server.url, {"client": "c", "since": 2, "epoch": server.position.epoch}
    )
    snapshot = back.snapshot
    assert snapshot["recovered"] is False
    assert "no longer kept" in snapshot["reason"]
    # The snapshot is the broadcast's position; what is committed but not broadcast yet
    # follows it, without a gap.
    assert snapshot["seq"] <= 30
    if snapshot["seq"] < 30:
        items = await back.items_until(30)
        assert [i["seq"] for i in items] == list(range(snapshot["seq"] + 1, 31))


async def test_since_without_epoch_is_refused(server: TallyServer, open_client: OpenClient) -> None:
    client = await open_client(server.url, {"client": "c", "since": 3})
    assert (await client.expect("error"))["code"] == "bad_since"
