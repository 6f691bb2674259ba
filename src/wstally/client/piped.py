"""``wstally client`` with stdin not a terminal: send every number, wait for every ack."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any, TextIO

from wstally.client.session import Acked, Event, Refused, Session, State, safe
from wstally.protocol import ProtocolError, parse_plain

__all__ = ["run_piped"]


def _read_lines(stream: TextIO, queue: asyncio.Queue[str | None]) -> None:
    loop = asyncio.get_running_loop()

    def pump() -> None:
        # A thread, because a blocking read of stdin cannot be awaited portably.
        for line in stream:
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, name="stdin", daemon=True).start()


async def run_piped(session_options: dict[str, Any], give_up_after: float, stream: TextIO) -> int:
    last_ack: list[Acked] = []
    refusals: list[Refused] = []
    down_since: list[float | None] = [None]

    def on_event(event: Event) -> None:
        if isinstance(event, Acked):
            if not last_ack or event.seq > last_ack[0].seq:
                last_ack[:] = [event]
        elif isinstance(event, Refused) and event.delta is not None:
            refusals.append(event)
            print(
                f"wstally client: {event.delta:+d} refused ({safe(event.code)}): "
                f"{safe(event.message, 200)}",
                file=sys.stderr,
            )
        elif isinstance(event, State):
            if event.state == "closed" and event.error:
                print(f"wstally client: {safe(event.error, 300)}", file=sys.stderr)
            if event.state == "connected":
                down_since[0] = None
            elif down_since[0] is None:
                down_since[0] = time.monotonic()

    session = Session(**session_options, on_event=on_event)
    code = await session.run_beside(
        _feed(session, stream, give_up_after, down_since, last_ack, refusals)
    )
    return 2 if code is None else code


async def _feed(
    session: Session,
    stream: TextIO,
    give_up_after: float,
    down_since: list[float | None],
    last_ack: list[Acked],
    refusals: list[Refused],
) -> int:
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    _read_lines(stream, queue)
    bad = sent = total_sent = 0
    lineno = 0
    while (line := await queue.get()) is not None:
        lineno += 1
        if not line.strip():
            continue
        try:
            delta = parse_plain(line.rstrip("\n"))
        except ProtocolError as exc:
            bad += 1
            print(f"wstally client: line {lineno} not sent: {exc.message}", file=sys.stderr)
            continue
        session.add(delta)
        sent += 1
        total_sent += delta
    # Everything is queued; wait for every answer, as long as the server stays reachable.
    while True:
        try:
            async with asyncio.timeout(0.2):
                await session.settled()
            break
        except TimeoutError:
            since = down_since[0]
            if since is not None and time.monotonic() - since > give_up_after:
                print(
                    f"wstally client: cannot reach {safe(session.url, 200)} "
                    f"(for {give_up_after:g}s); {len(session.outbox)} add(s) unacknowledged",
                    file=sys.stderr,
                )
                return 2
    acked = sent - len(refusals)
    print(
        f"wstally client: {acked} of {sent} add(s) acknowledged (sum {total_sent:+d})",
        file=sys.stderr,
    )
    print(last_ack[0].total if last_ack else session.total)
    return 1 if bad or refusals else 0
