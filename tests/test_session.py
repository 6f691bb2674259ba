"""The client session on its own: resends, refusals, settling, pacing, recovery."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

from helpers import GatedStore, OpenClient, ServerFactory, http_get, within
from wstally.client.events import Event, Paced, Refused
from wstally.client.prompt import PromptView
from wstally.client.session import Session


async def test_a_transient_refusal_is_resent_until_it_counts(make_server: ServerFactory) -> None:
    store = GatedStore()
    server = await make_server(store=store)
    events: list[Event] = []
    refused_seen = asyncio.Event()

    def on_event(event: Event) -> None:
        events.append(event)
        if isinstance(event, Refused):
            refused_seen.set()

    session = Session(server.url, on_event=on_event)
    runner = asyncio.create_task(session.run())
    try:
        async with asyncio.timeout(within(10)):
            await session.connected_once.wait()
        store.fail = True
        session.add(7)
        async with asyncio.timeout(within(10)):
            await refused_seen.wait()
        refused = next(e for e in events if isinstance(e, Refused))
        assert refused.code == "store_failed"
        assert session.outbox  # kept: the failure was not the add's fault
        store.fail = False
        async with asyncio.timeout(within(10)):
            await session.settled()
        assert server.position.total == 7
    finally:
        session.close()
        await runner


class Cuttable:
    """A TCP relay in front of a server, whose connections can be cut: a network drop while
    the server stays up (real sockets both ways)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class Said(PromptView):
    """The interactive view, keeping what it would print above the prompt."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.lines: list[str] = []

    def say(self, *parts: tuple[str, str]) -> None:
        self.lines.append("".join(text for _, text in parts))


def toolbar(view: PromptView) -> str:
    return "".join(text for _, text, *_ in view.toolbar())


async def wait_for(condition: Callable[[], bool], units: float = 10) -> None:
    async with asyncio.timeout(within(units)):
        while not condition():  # noqa: ASYNC110 - the session has no event for each of these
            await asyncio.sleep(0.01)


async def test_after_a_drop_the_client_says_how_many_updates_it_missed(
    make_server: ServerFactory, open_client: OpenClient
) -> None:
    server = await make_server(memory=True)
    relay = Cuttable(server.port)
    url = await relay.start()
    view: Said
    session = Session(url, on_event=lambda e: view.on_event(e), backoff=(0.5, 0.5))
    view = Said(session)
    # Before the first connection, there is no client count to show, not "0 clients".
    assert "client" not in toolbar(view)
    runner = asyncio.create_task(session.run())
    try:
        await wait_for(lambda: session.clients is not None)
        assert "│ 1 client │ connected" in toolbar(view)
        relay.cut()
        await wait_for(lambda: session.state == "reconnecting")
        # Disconnected: the last count may be stale, so none is shown.
        assert "client" not in toolbar(view)
        other = await open_client(server.url, {"client": "other"})
        for i in (1, 2):
            assert (await other.add(10 * i, f"r{i}"))["type"] == "ack"
        await wait_for(lambda: any("caught up" in line for line in view.lines))
    finally:
        session.close()
        await runner
        await relay.close()
    assert "✓ caught up: the 2 updates made while away are shown above" in view.lines
    assert (session.seq, session.total) == (2, 30)


async def test_rate_limited_adds_are_paced_and_resent_until_all_count(
    make_server: ServerFactory,
) -> None:
    server = await make_server(memory=True, rate_limit=200.0)
    events: list[Event] = []
    session = Session(server.url, on_event=events.append)
    runner = asyncio.create_task(session.run())
    try:
        for i in range(1, 801):
            session.add(i)
        async with asyncio.timeout(within(30)):
            await session.settled()
    finally:
        session.close()
        await runner
    assert (session.acked, session.refused) == (800, 0)
    _, _, body = await http_get(server.port, "/healthz")
    assert json.loads(body)["total"] == sum(range(1, 801))
    paced = [e for e in events if isinstance(e, Paced)]
    assert paced, "the limit was never met"
    assert session.pacer.cuts == len(paced)
    # Refusals of adds sent too fast before a cut cut nothing more: a few cuts, not hundreds.
    assert len(paced) < 10
