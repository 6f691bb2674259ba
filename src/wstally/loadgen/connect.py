"""Opening a worker's connections: many at once (bounded, optionally ramped), timed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import NamedTuple

from hdrh.histogram import HdrHistogram

from wstally.loadgen.histograms import micros
from wstally.loadgen.plan import Plan
from wstally.loadgen.wire import FrameClient, open_client

__all__ = ["Connected", "connect_all", "greet_watcher", "stall"]

# Handshakes in flight at once: enough to keep a server busy, few enough not to time out.
CONCURRENT_HANDSHAKES = 200
ERRORS_KEPT = 5


class Connected(NamedTuple):
    clients: list[FrameClient | None]  # None where the connection failed
    failed: int
    errors: list[str]  # the first few failures


async def connect_all(
    plan: Plan, callbacks: list[Callable[[bytes], None]], homes: list[int], hist: HdrHistogram
) -> Connected:
    """Connection i with ``callbacks[i]`` to target ``homes[i]``; each handshake timed."""
    sem = asyncio.Semaphore(CONCURRENT_HANDSHAKES)
    errors: list[str] = []
    ramp_step = plan.ramp / max(1, len(callbacks))

    async def one(i: int, on_text: Callable[[bytes], None]) -> FrameClient | None:
        host, port = plan.targets[homes[i]]
        if ramp_step:
            await asyncio.sleep(i * ramp_step)
        async with sem:
            started = time.monotonic()
            try:
                async with asyncio.timeout(plan.connect_timeout):
                    client = await open_client(host, port, on_text, *plan.access())
            except Exception as exc:  # any failure is counted, and the verdict fails
                if len(errors) < ERRORS_KEPT:
                    errors.append(f"{type(exc).__name__}: {exc}")
                return None
            hist.record_value(micros(time.monotonic() - started))
            return client

    clients = await asyncio.gather(*(one(i, cb) for i, cb in enumerate(callbacks)))
    return Connected(list(clients), sum(1 for c in clients if c is None), errors)


def greet_watcher(plan: Plan, index: int, conn: FrameClient) -> None:
    # The server holds a new connection's snapshot until its hello (or 50 ms): say it.
    conn.send(b'{"type":"hello","client":"%s-w%d-%d"}' % (plan.run_id.encode(), plan.index, index))


async def stall(plan: Plan) -> list[FrameClient]:
    """Connections that read their snapshot and then nothing: the slow-consumer probe."""
    return [await _stalled_reader(plan, *plan.targets[u]) for u in plan.stalled_homes()]


async def _stalled_reader(plan: Plan, host: str, port: int) -> FrameClient:
    client: FrameClient | None = None

    def stop_reading(_payload: bytes) -> None:
        # The first frame (the snapshot) arrives once the client exists: stop there.
        if client is not None and client.transport is not None:
            client.transport.pause_reading()

    async with asyncio.timeout(plan.connect_timeout):
        client = await open_client(host, port, stop_reading, *plan.access())
    return client
