"""The batcher: what it hands the engine, and when."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from helpers import OpenClient, ServerFactory, within
from wstally.engine.base import Result, Submission
from wstally.hub import Peer


def adds(peer: Peer, first: int, count: int) -> list[tuple[Peer, Submission]]:
    return [
        (peer, Submission(1, peer.id, time.time(), None, None, f"a{n}"))
        for n in range(first, first + count)
    ]


async def test_adds_ready_when_a_round_ends_join_the_next_batch(
    make_server: ServerFactory, open_client: OpenClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await make_server(memory=True)
    client = await open_client(server.url, {"client": "b"})
    (peer,) = server.hub.peers
    engine, batcher = server.engine, server.batcher
    submit = engine.submit
    gate = asyncio.Event()
    batches: list[int] = []

    async def gated(batch: Sequence[Submission]) -> list[Result]:
        batches.append(len(batch))
        await gate.wait()
        return await submit(batch)

    monkeypatch.setattr(engine, "submit", gated)
    batcher.add_all(adds(peer, 0, 1))
    async with asyncio.timeout(within(5)):
        while not batches:  # noqa: ASYNC110 - the batcher's task, in this loop
            await asyncio.sleep(0)
    batcher.add_all(adds(peer, 1, 3))  # while the first round is with the engine
    gate.set()  # the first round ends at the next loop turn...
    loop = asyncio.get_running_loop()
    loop.call_soon(batcher.add_all, adds(peer, 4, 3))  # ...with these reads ready behind it
    await asyncio.wait_for(batcher.drain(), within(5))
    assert batches == [1, 6]  # not [1, 3, 3]: the reads waited for joined the second batch
    assert server.position.seq == 7
    acks = [await client.recv() for _ in range(7)]
    assert [(a["type"], a["id"], a["seq"]) for a in acks] == [
        ("ack", f"a{n}", n + 1) for n in range(7)
    ]
