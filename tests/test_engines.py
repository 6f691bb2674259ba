"""Every engine, one behaviour: the same random batches give the same answers everywhere.

A differential property test: hypothesis draws batches of submissions (int64 edges and
overflowing sums, ids resent within and across batches, scopes that differ only in where
the scope ends and the id begins, adds without ids) and feeds each batch to every engine:
the local engine over memory and over SQLite, and the Redis engine on a private
redis-server. Results, feed and history must be equal, field for field (refusals by code:
their wording is each engine's own).
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis

from helpers import within
from redisproc import RedisServer
from wstally.engine.base import Engine, FeedEvent, Published, Result, Submission
from wstally.engine.local import LocalEngine
from wstally.engine.redis import RedisEngine
from wstally.store import MemoryStore, SQLiteStore
from wstally.tally import DEDUP_WINDOW, INT64_MAX, INT64_MIN, Refused, Update

# Few, so that deltas meet the int64 edges often and ids are resent often; "a" with "1b"
# and "a1" with "b" would be one key if scope and id were simply joined.
CONNS = ("c0", "c1", "c2")
CLIENTS = (None, "a", "a1", "conn:c0")
IDS = (None, "1b", "b", "r", "", "é")
EDGES = (INT64_MAX, INT64_MIN, INT64_MAX - 1, INT64_MIN + 1, 2**62, -(2**62), 2**53 + 1)

deltas = st.one_of(
    st.integers(-5, 5),
    st.sampled_from(EDGES),
    st.integers(INT64_MIN, INT64_MAX),
)
submissions = st.builds(
    Submission,
    delta=deltas,
    conn=st.sampled_from(CONNS),
    at=st.floats(0, 4e9, allow_nan=False),
    client=st.sampled_from(CLIENTS),
    name=st.none() | st.sampled_from(("ann", "bøb", "")),
    req_id=st.sampled_from(IDS),
)
batches = st.lists(st.lists(submissions, min_size=1, max_size=8), min_size=1, max_size=8)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the module: a fresh key prefix per example instead."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_client(redis_server: RedisServer) -> Iterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True, protocol=2)
    yield client
    client.close()


def _outcome(result: Result) -> Any:
    # A refusal's message is each engine's own wording; its code is the contract.
    return ("refused", result.code) if isinstance(result, Refused) else result


async def _open_local(store: Any, window: int) -> LocalEngine:
    engine = LocalEngine(store)
    await engine.open()
    # The dedup window is the tally's; a small one makes ids leave it within an example.
    engine.tally.window = window
    return engine


async def _feed(engine: Engine, count: int) -> list[FeedEvent]:
    """The first events of the feed, up to ``count`` updates."""
    events: list[FeedEvent] = []
    seen = 0
    if count == 0:
        return events
    # Both engines' feeds are async generators: closed here, not left to the collector.
    feed = cast(AsyncGenerator[FeedEvent, None], engine.feed())
    async with asyncio.timeout(within(10)), aclosing(feed):
        async for event in feed:
            events.append(event)
            seen += len(event.updates) if isinstance(event, Published) else 0
            if seen >= count:
                break
    return events


async def _run(
    batches: Sequence[Sequence[Submission]],
    window: int,
    redis_url: str,
    prefix: str,
    since: int,
    limit: int,
) -> dict[str, dict[str, Any]]:
    """Every engine's results, feed and history for ``batches``, by engine."""
    seen: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        engines: dict[str, Engine] = {
            "memory": await _open_local(MemoryStore(), window),
            "sqlite": await _open_local(SQLiteStore(Path(tmp) / "tally.db"), window),
        }
        redis = RedisEngine(redis_url, prefix, node="diff", window=window)
        engines["redis"] = redis
        try:
            opened = await redis.open()
            assert (opened.seq, opened.total) == (0, 0)
            for name, engine in engines.items():
                results = [_outcome(r) for batch in batches for r in await engine.submit(batch)]
                count = sum(isinstance(r, Update) for r in results)
                events = await _feed(engine, count)
                seen[name] = {
                    "results": results,
                    "events": [type(e).__name__ for e in events],
                    "feed": [u for e in events if isinstance(e, Published) for u in e.updates],
                    "history": await engine.history(0, 10_000),
                    "some history": await engine.history(since, limit),
                }
        finally:
            for engine in engines.values():
                await engine.close()
    return seen


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    batches=batches,
    window=st.sampled_from((2, 5, DEDUP_WINDOW)),
    since=st.integers(0, 40),
    limit=st.integers(0, 40),
)
def test_every_engine_answers_publishes_and_keeps_the_same(
    redis_server: RedisServer,
    redis_client: Redis,
    batches: list[list[Submission]],
    window: int,
    since: int,
    limit: int,
) -> None:
    prefix = f"diff-{uuid.uuid4().hex}"
    try:
        seen = asyncio.run(_run(batches, window, redis_server.url, prefix, since, limit))
    finally:
        # A fresh prefix per example; its keys go, so that the module's Redis stays small.
        keys = list(redis_client.scan_iter(match="{" + prefix + "}:*"))
        if keys:
            redis_client.delete(*keys)
    reference = seen["memory"]
    applied = [r for r in reference["results"] if isinstance(r, Update)]
    # The reference itself is what the contract says: the feed and history are the
    # applied updates, gapless, in seq order.
    assert reference["feed"] == reference["history"] == applied
    assert [u.seq for u in applied] == list(range(1, len(applied) + 1))
    assert reference["some history"] == applied[since : since + limit]
    for name in ("sqlite", "redis"):
        for part in ("results", "feed", "history", "some history"):
            assert seen[name][part] == reference[part], (name, part)
        assert set(seen[name]["events"]) <= {"Published"}, name
