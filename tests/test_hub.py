"""The hub's broadcast, written a slice at a time, over real connections."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from websockets.asyncio.client import connect

from helpers import JsonClient, OpenClient, ServerFactory, within
from wstally import handler as handler_module
from wstally import rounds as rounds_module
from wstally.contention import Contention
from wstally.fanout import Phase
from wstally.peer import Peer
from wstally.protocol import SUBPROTOCOL
from wstally.server import TallyServer
from wstally.tally import Update


@pytest.fixture
async def sliced(make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> TallyServer:
    """A server whose broadcasts have no time budget: a round to N peers takes a loop turn
    per SLICE_CHECK of them, so that what happens between slices can be tested."""
    monkeypatch.setattr(rounds_module, "SLICE", 0.0)
    return await make_server(memory=True)


async def test_a_broadcast_in_slices_reaches_everyone_once_and_in_order(
    sliced: TallyServer, open_client: OpenClient
) -> None:
    # No time budget: every slice is SLICE_CHECK peers, so each broadcast to the 40
    # watchers takes several loop turns, during which adds arrive, acks leave and late
    # joiners go live with a snapshot. None of them may get an update twice or miss one.
    server = sliced
    hub = server.hub
    rounds: list[rounds_module.Round] = []  # kept alive, so that their ids stay theirs
    slices: dict[int, int] = {}
    next_slice = hub.rounds._next

    def counting(budget: float | None = None) -> None:
        current = hub.rounds.current
        if current is not None:
            if id(current) not in slices:
                rounds.append(current)
            slices[id(current)] = slices.get(id(current), 0) + 1
        next_slice(budget)

    hub.rounds._next = counting  # type: ignore[method-assign]
    watchers = [await open_client(server.url, {"client": f"w{i}"}) for i in range(40)]
    senders, per_sender = watchers[:3], 100
    late: list[JsonClient] = []

    async def send(client: JsonClient, name: str) -> None:
        for i in range(per_sender):
            await client.send({"type": "add", "delta": 1, "id": f"{name}-{i}"})
            await asyncio.sleep(0)

    async def join() -> None:
        for i in range(10):
            late.append(await open_client(server.url, {"client": f"late{i}"}))

    await asyncio.gather(*(send(c, f"s{n}") for n, c in enumerate(senders)), join())
    last = len(senders) * per_sender
    for client in watchers + late:
        items = await client.items_until(last)
        start = int(client.snapshot["seq"])
        assert [i["seq"] for i in items] == list(range(start + 1, last + 1))
        assert [i["total"] for i in items] == list(range(start + 1, last + 1))
    joined_midway = [c for c in late if 0 < int(c.snapshot["seq"]) < last]
    assert joined_midway, "no late client went live while updates were flowing"
    for client in senders:
        acks = [f for f in client.frames if f["type"] == "ack"]
        assert len(acks) == per_sender
    # 40 to 50 peers in slices of 16: a broadcast to all took three or four turns.
    assert max(slices.values()) >= 3


async def test_a_write_that_raises_does_not_stop_the_broadcasts(
    make_server: ServerFactory, open_client: OpenClient
) -> None:
    # A transport can raise on write once its handle is closed, before connection_lost has
    # run: the rest of that broadcast, and every later one, must still go out.
    server = await make_server(memory=True)
    broken, *others = [await open_client(server.url, {"client": f"c{i}"}) for i in range(3)]
    sender = others[0]
    (peer,) = [p for p in server.hub.peers if p.client == "c0"]

    def refuse(data: bytes | bytearray | memoryview) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

    real_write = peer.ws.transport.write
    peer.ws.transport.write = refuse  # type: ignore[method-assign]
    with capture_logs() as logs:
        for delta in (1, 2, 3):
            assert (await sender.add(delta, f"a{delta}"))["type"] == "ack"
            for client in others:
                items = await client.items_until(delta)
                assert items[-1]["total"] == sum(range(1, delta + 1))
    assert server.hub.rounds.current is None
    assert broken.items() == []
    failed = [e for e in logs if e["event"] == "broadcast.write_failed"]
    assert failed
    assert {e["client"] for e in failed} == {"c0"}
    peer.ws.transport.write = real_write  # type: ignore[method-assign]


async def test_each_watcher_is_written_what_was_published_up_to_its_turn(
    sliced: TallyServer, open_client: OpenClient
) -> None:
    # A round visits the watchers in registration order, a slice per loop turn. An update
    # published while it is under way goes to the watchers it has not reached yet in the
    # same write as the round's own, and to those it has passed in the next round: nobody
    # late in a round is written a stale one, nobody gets an update twice or misses one.
    server = sliced
    hub = server.hub
    watchers = [await open_client(server.url, {"client": f"w{i}"}) for i in range(40)]
    assert [peer.client for peer in hub.peers] == [f"w{i}" for i in range(40)]
    seq, total = hub.seq, hub.total
    first = Update(seq + 1, 5, total + 5, 0.0, "test")
    second = Update(seq + 2, 7, total + 12, 0.0, "test")
    hub.publish([first])
    hub.flush()  # the round's first slice, now: SLICE_CHECK watchers
    assert hub.rounds.current is not None
    reached = hub.rounds.current.index
    assert reached == rounds_module.SLICE_CHECK
    hub.publish([second])
    for i, watcher in enumerate(watchers):
        await watcher.items_until(seq + 2)
        frames = [[i["seq"] for i in f["items"]] for f in watcher.frames if f["type"] == "updates"]
        if i < reached:
            assert frames == [[seq + 1], [seq + 2]], i
        else:
            assert frames == [[seq + 1, seq + 2]], i
        assert watcher.items()[-1]["total"] == total + 12
    assert hub.rounds.current is None
    assert hub.deliveries == 80


async def test_a_client_told_the_count_by_its_snapshot_is_not_told_an_older_one(
    sliced: TallyServer, open_client: OpenClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A round that announces the client count takes it at each connection's turn: one that
    # went live in the middle of the round, with the count in its snapshot, must not then
    # be told the count the round started with.
    monkeypatch.setattr(handler_module, "HELLO_WINDOW", within(10))
    server = sliced
    hub = server.hub
    watchers = [await open_client(server.url, {"client": f"w{i}"}) for i in range(40)]
    late = await connect(server.url, subprotocols=[SUBPROTOCOL])  # no hello: it waits
    async with asyncio.timeout(within(5)):
        while hub.clients < 41:  # noqa: ASYNC110 - polled server state
            await asyncio.sleep(0.01)
    (waiting,) = [p for p in hub.peers if p.phase is Phase.WAITING]
    (leaving,) = [p for p in hub.peers if p.client == "w39"]
    seq, total = hub.seq, hub.total
    hub.publish([Update(seq + 1, 1, total + 1, 0.0, "test")])
    hub._presence_due()  # a round announcing 41 clients: its first slice, now
    assert hub.rounds.current is not None
    assert hub.rounds.current.index < len(hub.rounds.current.targets)
    hub.unregister(leaving)  # 40 clients
    hub.release(waiting)  # its snapshot says 40
    snapshot = json.loads(await asyncio.wait_for(late.recv(), within(5)))
    assert (snapshot["type"], snapshot["clients"], snapshot["seq"]) == ("snapshot", 40, seq + 1)
    for watcher in watchers[:39]:
        await watcher.items_until(seq + 1)
    async with asyncio.timeout(within(5)):
        while hub.rounds.current is not None:  # noqa: ASYNC110 - polled server state
            await asyncio.sleep(0.01)
    await asyncio.sleep(2 * hub.presence_interval)  # the leave's own presence round
    with pytest.raises(TimeoutError):
        frame = await asyncio.wait_for(late.recv(), within(0.5))
        raise AssertionError(f"after its snapshot it was sent {frame}")
    await late.close()


async def test_a_gap_in_the_feed_tells_everyone_the_new_position(
    make_server: ServerFactory, open_client: OpenClient
) -> None:
    # The hub's log is indexed by seq: an update that does not follow the last one would
    # shift every range after it. Everyone gets a snapshot at the new position instead.
    server = await make_server(memory=True)
    hub = server.hub
    watchers = [await open_client(server.url, {"client": f"w{i}"}) for i in range(3)]
    seq, total = hub.seq, hub.total
    with capture_logs() as logs:
        hub.publish([Update(seq + 5, 1, total + 9, 0.0, "test")])
    assert [e for e in logs if e["event"] == "broadcast.gap"] == [
        {"event": "broadcast.gap", "log_level": "error", "seq": seq, "next": seq + 5}
    ]
    for watcher in watchers:
        snapshot = await watcher.expect("snapshot")
        assert (snapshot["seq"], snapshot["total"]) == (seq + 5, total + 9)
        assert snapshot["recovered"] is False
    assert (hub.seq, hub.total) == (seq + 5, total + 9)
    hub.publish([Update(seq + 6, 1, total + 10, 0.0, "test")])
    for watcher in watchers:
        assert [i["seq"] for i in await watcher.items_until(seq + 6)] == [seq + 6]


@pytest.mark.parametrize("contended", [False, True], ids=["idle_cpu", "contended_cpu"])
async def test_the_next_round_waits_longer_while_the_cpu_is_contended(
    make_server: ServerFactory, open_client: OpenClient, tmp_path: Path, contended: bool
) -> None:
    # Rounds of ~80 ms of work (two watchers, 40 ms each). With the CPU to spare, the next
    # round may start 1.5x that after the last one started: 40 ms after it ended. While the
    # loop's thread waits for a CPU, twice that after it ended as if written in one go:
    # 80 ms after it ended.
    server = await make_server(memory=True)
    hub = server.hub
    first, _second = [await open_client(server.url, {"client": f"w{i}"}) for i in range(2)]
    assert (await first.expect("presence"))["clients"] == 2  # the joins' presence round
    stat = tmp_path / "schedstat"
    stat.write_text("0 0 0\n")
    hub.contention.close()
    hub.contention = Contention(str(stat), window=math.inf)
    hub.contention.contended = contended
    visit, done, start = hub.rounds._visit, hub.rounds._done, hub.rounds.start
    starts: list[float] = []
    ends: list[float] = []

    def slow_visit(peer: Peer, round_: rounds_module.Round) -> None:
        until = time.perf_counter() + 0.04
        while time.perf_counter() < until:
            pass
        visit(peer, round_)

    def recorded_start(round_: rounds_module.Round, sliced: bool = True) -> None:
        starts.append(time.perf_counter())
        start(round_, sliced)

    second_done = asyncio.Event()

    def recorded_done(round_: rounds_module.Round) -> None:
        ends.append(time.perf_counter())
        done(round_)
        if len(ends) == 1:  # the next update as soon as the first round ends
            hub.publish([Update(hub.seq + 1, 1, hub.total + 1, 0.0, "test")])
        else:
            second_done.set()

    hub.rounds._visit = slow_visit
    hub.rounds.start = recorded_start  # type: ignore[method-assign]
    hub.rounds._done = recorded_done
    hub.publish([Update(hub.seq + 1, 1, hub.total + 1, 0.0, "test")])
    await asyncio.wait_for(second_done.wait(), within(5))
    assert len(starts) == len(ends) == 2
    cost = ends[0] - starts[0]
    gap = starts[1] - ends[0]
    assert cost >= 0.08
    if contended:
        assert gap >= cost - 0.002
    else:
        assert cost / 2 - 0.002 <= gap < cost / 2 + within(0.03)
