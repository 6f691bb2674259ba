"""The client session on its own: resends, refusals, settling."""

from __future__ import annotations

import asyncio

from helpers import GatedStore, ServerFactory, within
from wstally.client.session import Event, Refused, Session


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
        assert server.tally.committed_total == 7
    finally:
        session.close()
        await runner
