"""The Redis engine against real, private redis-server processes (never the shared 6379).

Faults are real too: Redis killed with SIGKILL and restarted from its AOF or empty, and a
TCP proxy that cuts a connection between a command and its reply (an unknown outcome).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import os
import random
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs
from structlog.typing import EventDict

from helpers import within
from redisproc import RedisServer
from wstally import logsetup
from wstally.engine.base import EngineError, FeedEvent, Position, Published, Reset, Submission
from wstally.engine.redis import RedisEngine, durability_risks, redact_url
from wstally.history import verify_kept
from wstally.redis_history import RedisHistory
from wstally.tally import INT64_MAX, INT64_MIN, Duplicate, Refused, Update

EngineFactory = Callable[..., Awaitable[RedisEngine]]

META, LOG, IDS = "{wstally}:meta", "{wstally}:log", "{wstally}:ids"


AT = 1_700_000_000.25


def add(delta: int, req_id: str | None = None, **fields: Any) -> Submission:
    fields.setdefault("conn", "conn-1")
    fields.setdefault("at", AT)
    return Submission(delta, req_id=req_id, **fields)


def seqs(results: list[Any]) -> list[int]:
    return [r.seq for r in results]


def applied(results: list[Any]) -> list[Update]:
    return [r for r in results if isinstance(r, Update)]


@pytest.fixture
async def inspect(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client to look at (or tamper with) what the engine keeps in Redis."""
    client = Redis.from_url(redis_server.url, decode_responses=True, protocol=2)
    yield client
    await client.aclose()


@pytest.fixture
async def engines(redis_server: RedisServer) -> AsyncIterator[EngineFactory]:
    """Open engines (on the test's Redis unless told another URL); all closed at the end."""
    opened: list[RedisEngine] = []

    async def make(url: str | None = None, **options: Any) -> RedisEngine:
        engine = RedisEngine(url or redis_server.url, **options)
        opened.append(engine)
        await engine.open()
        return engine

    yield make
    for engine in opened:
        await engine.close()


class FeedReader:
    """Reads an engine's feed on a task and keeps every event."""

    def __init__(self, engine: RedisEngine) -> None:
        self.events: list[FeedEvent] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._read(engine))

    async def _read(self, engine: RedisEngine) -> None:
        async for event in engine.feed():
            self.events.append(event)
            self._changed.set()

    def updates(self) -> list[Update]:
        return [u for e in self.events if isinstance(e, Published) for u in e.updates]

    def resets(self) -> list[Reset]:
        return [e for e in self.events if isinstance(e, Reset)]

    async def until(self, predicate: Callable[[], object], units: float = 5) -> None:
        async with asyncio.timeout(within(units)):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def until_seq(self, seq: int, units: float = 5) -> list[Update]:
        await self.until(lambda: self.updates() and self.updates()[-1].seq >= seq, units)
        return self.updates()

    async def stop(self) -> None:
        # Safe to cancel: the reader only waits on the engine's queue, never inside Redis.
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def feeds(engines: EngineFactory) -> AsyncIterator[Callable[[RedisEngine], FeedReader]]:
    readers: list[FeedReader] = []

    def follow(engine: RedisEngine) -> FeedReader:
        reader = FeedReader(engine)
        readers.append(reader)
        return reader

    yield follow
    for reader in readers:
        await reader.stop()


@contextlib.contextmanager
def logged(level: str = "info") -> Iterator[list[EventDict]]:
    """The events logged at ``level`` and above, as dicts."""
    logsetup.configure("json", level, stream=io.StringIO())
    try:
        with capture_logs() as events:
            yield events
    finally:
        logsetup.configure("json", os.environ.get("WSTALLY_TEST_LOG_LEVEL", "warning"))


def assert_gapless(updates: list[Update], first: int = 1) -> None:
    assert [u.seq for u in updates] == list(range(first, first + len(updates)))
    for before, after in itertools.pairwise(updates):
        assert after.total == before.total + after.delta


# -- configuration, without Redis ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6390/0", "redis://127.0.0.1:6390/0"),
        ("redis://:s3cret@db:6390/2", "redis://:***@db:6390/2"),
        ("rediss://app:s3cret@db/0", "rediss://app:***@db/0"),
        ("unix:///run/redis.sock?db=1&password=s3cret", "unix:///run/redis.sock?db=1&password=***"),
    ],
)
def test_description_hides_the_password(url: str, shown: str) -> None:
    engine = RedisEngine(url)
    assert engine.description == redact_url(url) == shown
    assert engine.name == "redis"


def test_durability_risks_name_each_setting() -> None:
    durable = {"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction"}
    assert durability_risks(durable) == []
    risks = durability_risks({**durable, "appendonly": "no", "maxmemory-policy": "allkeys-lru"})
    assert len(risks) == 2
    assert "appendonly" in risks[0]
    assert "allkeys-lru" in risks[1]
    (risk,) = durability_risks({**durable, "appendfsync": "everysec"})
    assert "everysec" in risk


# -- open, status, durability warnings -----------------------------------------------------


async def test_open_starts_one_history_shared_by_nodes(
    redis_server: RedisServer, engines: EngineFactory
) -> None:
    first = RedisEngine(redis_server.url, node="a")
    assert first.status()["redis"] == "disconnected"
    try:
        position = await first.open()
        assert first.status() == {
            "engine": "redis",
            "node": "a",
            "redis": "connected",
            "url": first.description,
            "epoch": position.epoch,
            "resets": 0,
        }
    finally:
        await first.close()
    assert position.seq == position.total == 0
    assert len(position.epoch) == 16
    second = await engines(node="b")
    assert second.status()["epoch"] == position.epoch


async def test_a_unix_socket_url_works(tmp_path: Path) -> None:
    # Socket paths are limited to ~100 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="wstally-") as short:
        sock = Path(short) / "redis.sock"
        server = RedisServer(tmp_path / "redis", "--unixsocket", str(sock))
        server.start()
        # The URL cannot undo what the engine relies on (here: RESP2 replies).
        engine = RedisEngine(f"unix://{sock}?db=0&protocol=3")
        try:
            await engine.open()
            feed = engine.feed()
            results = await engine.submit([add(1, "a"), add(2)])
            assert await asyncio.wait_for(anext(feed), within(5)) == Published(applied(results))
        finally:
            await engine.close()
            server.stop()


async def test_durable_redis_logs_no_warning(redis_server: RedisServer) -> None:
    engine = RedisEngine(redis_server.url)
    with capture_logs() as logs:
        await engine.open()
    await engine.close()
    assert [e for e in logs if e["log_level"] == "warning"] == []


@pytest.mark.parametrize(
    ("extra", "risky"),
    [
        (("--appendonly", "no", "--maxmemory-policy", "allkeys-lru"), ["appendonly", "allkeys"]),
        (("--appendfsync", "everysec"), ["everysec"]),
    ],
)
async def test_not_durable_redis_logs_one_warning(
    tmp_path: Path, extra: tuple[str, ...], risky: list[str]
) -> None:
    server = RedisServer(tmp_path, *extra)
    server.start()
    try:
        engine = RedisEngine(server.url)
        with capture_logs() as logs:
            await engine.open()
        await engine.close()
    finally:
        server.stop()
    (event,) = [e for e in logs if e["log_level"] == "warning"]
    assert event["event"] == "engine.not_durable"
    assert event["url"] == engine.description
    assert len(event["risks"]) == len(risky)
    for risk, word in zip(event["risks"], risky, strict=True):
        assert word in risk


async def test_config_disabled_is_logged_as_unchecked(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, "--rename-command", "CONFIG", "")
    server.start()
    try:
        engine = RedisEngine(server.url)
        with capture_logs() as logs:
            await engine.open()
            results = await engine.submit([add(1)])
        await engine.close()
    finally:
        server.stop()
    assert seqs(results) == [1]
    (event,) = [e for e in logs if e["log_level"] == "warning"]
    assert event["event"] == "engine.durability_unchecked"
    assert "error" in event


# -- batches: int64, duplicates, the window ------------------------------------------------


async def test_totals_are_exact_int64_and_overflow_refuses_one_add(
    engines: EngineFactory, inspect: Redis
) -> None:
    engine = await engines()
    results = await engine.submit(
        [add(2**62 + 1), add(2**62 - 3), add(1), add(1), add(-1), add(2**63), add(1)]
    )
    assert [getattr(r, "total", None) for r in results] == [
        2**62 + 1,
        INT64_MAX - 1,
        INT64_MAX,
        None,
        INT64_MAX - 1,
        None,
        INT64_MAX,
    ]
    assert isinstance(results[3], Refused)
    assert results[3].code == "overflow"
    assert "total unchanged" in results[3].message
    assert isinstance(results[5], Refused)
    assert results[5].code == "bad_delta"
    assert seqs([r for r in results if isinstance(r, Update)]) == [1, 2, 3, 4, 5]

    results = await engine.submit([add(-INT64_MAX), add(-INT64_MAX), add(INT64_MIN), add(-1)])
    assert [getattr(r, "total", None) for r in results] == [0, -INT64_MAX, None, INT64_MIN]
    refused = await engine.submit([add(-1)])
    assert isinstance(refused[0], Refused)
    assert refused[0].code == "overflow"
    assert await inspect.hget(META, "total") == str(INT64_MIN)
    history = await engine.history(0, 100)
    assert [u.total for u in history][-1] == INT64_MIN
    assert_gapless(history)
    twice = await engine.submit([add(2**62), add(2**62), add(2**62), add(2**62)])
    assert [getattr(r, "total", None) for r in twice] == [-(2**62), 0, 2**62, None]


async def test_duplicate_from_another_node_gets_the_original_result(
    engines: EngineFactory,
) -> None:
    a = await engines(node="a")
    b = await engines(node="b")
    first = await a.submit([add(5, "r1", client="alice", conn="c-a"), add(7, "r2", conn="c-a")])
    assert seqs(first) == [1, 2]
    await b.submit([add(100, conn="c-b")])
    again = await b.submit(
        [
            add(5, "r1", client="alice", conn="c-b"),  # same client, another connection
            add(7, "r2", conn="c-b"),  # no hello: ids belong to their connection
            add(9, "r3", client="alice", conn="c-b"),
            add(9, "r3", client="alice", conn="c-b"),  # resent within the batch
        ]
    )
    assert again == [
        Duplicate("r1", 1, 5),
        Update(4, 7, 119, AT, "c-b", None, None, "r2"),
        Update(5, 9, 128, AT, "c-b", "alice", None, "r3"),
        Duplicate("r3", 5, 128),
    ]
    # A client named like a connection scope does not share that connection's ids.
    assert seqs(await a.submit([add(1, "r2", client="c-a", conn="c-x")])) == [6]


async def test_every_field_of_an_add_comes_back_as_sent(engines: EngineFactory) -> None:
    # The payload is JSON built from parts (cached per connection): any text, any time.
    texts = ['q"u\\o', "ü€😀", "\x00\x1f\n\t", "\u2028", "conn:x", "", "[1,"]
    batch = [
        add(n, f"r{n}{text}", conn=f"c{text}", client=text or None, name=text, at=at)
        for n, (text, at) in enumerate(
            itertools.product(texts, [AT, 0.1 + 0.2, 1e22, 5e-324, 7.0, -1.5])
        )
    ]
    batch += [add(1, None, conn="plain", at=AT), add(2, None, conn="plain", at=AT + 1)]
    engine = await engines()
    assert all(isinstance(r, Update) for r in await engine.submit(batch))
    stored = await engine.history(0, 1000)  # decoded from the stream entry
    assert [(u.at, u.conn, u.client, u.name, u.req_id, u.delta) for u in stored] == [
        (s.at, s.conn, s.client, s.name, s.req_id, s.delta) for s in batch
    ]


async def test_totals_stay_exact_across_2_53_where_lua_stops_adding(
    engines: EngineFactory, inspect: Redis
) -> None:
    # The script adds small deltas itself while the total is exact as a Lua double (below
    # 2^53) and hands the rest to HINCRBY: the totals must not tell which did the adding.
    engine = await engines()
    exact = 2**53
    deltas = [exact - 3, 1, 1, 1, 1, 10**15, -(10**15), -2, -3, 5, -(exact + 5), 0, -1]
    rng = random.Random(53)
    deltas += [rng.choice([1, -1, 7, 10**14, -(10**14), exact, -exact, 2**62]) for _ in range(300)]
    expected: list[int | None] = []
    total = 0
    for delta in deltas:
        fits = INT64_MIN <= total + delta <= INT64_MAX
        expected.append(total + delta if fits else None)
        total = total + delta if fits else total
    results: list[Any] = []
    for start in range(0, len(deltas), 37):
        results += await engine.submit([add(d) for d in deltas[start : start + 37]])
    assert [getattr(r, "total", None) for r in results] == expected
    assert await inspect.hget(META, "total") == str(total)
    applied = [r for r in results if isinstance(r, Update)]
    assert await engine.history(0, 1000) == applied


async def test_ids_leave_the_window_and_the_stream_is_trimmed(
    engines: EngineFactory, inspect: Redis
) -> None:
    engine = await engines(window=3, keep=10)
    for n in range(1, 6):
        await engine.submit([add(1, f"r{n}", client="c")])
    again = await engine.submit([add(1, "r1", client="c"), add(1, "r3", client="c")])
    assert isinstance(again[0], Update)  # 5 updates later, r1 was forgotten
    assert again[1] == Duplicate("r3", 3, 3)  # still within the last 3 updates
    for n in range(100):
        await engine.submit([add(1, f"s{n}-{k}", client="c") for k in range(5)])
    assert await inspect.hlen(IDS) <= 3 + 5
    assert await inspect.xlen(LOG) < 60  # one entry per batch: 5 updates each
    history = await engine.history(0, 1000)
    assert 10 <= len(history) < 300
    assert history[-1].seq == 506
    assert_gapless(history, first=history[0].seq)


async def test_the_window_is_exact_inside_a_batch_entry(
    engines: EngineFactory, inspect: Redis
) -> None:
    # One entry holds seqs 1 to 5 (stored under 5-0): with a window of 3, the ids of
    # seqs 1 and 2 are forgotten although their entry stays, as the local engine does.
    engine = await engines(window=3)
    await engine.submit([add(1, f"r{n}", client="c") for n in range(1, 6)])
    assert sorted(await inspect.hkeys(IDS)) == ["8:client:cr3", "8:client:cr4", "8:client:cr5"]
    again = await engine.submit([add(1, "r2", client="c"), add(1, "r3", client="c")])
    assert again == [Update(6, 1, 6, AT, "conn-1", "c", None, "r2"), Duplicate("r3", 3, 3)]
    # The next batch forgets seq 4, still in the first entry, and keeps r2's new seq 6.
    await engine.submit([add(1, "r7", client="c")])
    assert sorted(await inspect.hkeys(IDS)) == ["8:client:cr2", "8:client:cr5", "8:client:cr7"]


async def test_a_history_of_one_entry_per_update_goes_on(
    redis_server: RedisServer, engines: EngineFactory, inspect: Redis
) -> None:
    # Written by a version before batch entries: the feed, history, dedup, the window and
    # --verify carry on over it, and new batches are appended as batch entries.
    await inspect.hset(META, mapping={"epoch": "e-old", "seq": "3", "total": "6", "pruned": "0"})
    for n in (1, 2, 3):
        key = f"8:client:cr{n}"
        payload = json.dumps([AT, "conn-1", "c", None, f"r{n}"])
        fields: dict[Any, Any] = {"e": "e-old", "s": n, "d": n, "t": n * (n + 1) // 2}
        fields.update(k=key, p=payload)
        await inspect.xadd(LOG, fields, id=f"{n}-0")
        await inspect.hset(IDS, key, f"{n} {n * (n + 1) // 2}")
    engine = await engines(window=4, keep=100)
    assert await engine.submit([add(9, "r2", client="c"), add(4, "r4", client="c")]) == [
        Duplicate("r2", 2, 3),
        Update(4, 4, 10, AT, "conn-1", "c", None, "r4"),
    ]
    for n in range(5, 12):
        await engine.submit([add(n, f"r{n}", client="c")])
    history = await engine.history(0, 100)
    assert [(u.seq, u.delta, u.total, u.req_id) for u in history[:4]] == [
        (1, 1, 1, "r1"),
        (2, 2, 3, "r2"),
        (3, 3, 6, "r3"),
        (4, 4, 10, "r4"),
    ]
    assert_gapless(history)
    assert [u.seq for u in await engine.history(2, 2)] == [3, 4]
    assert not await inspect.hexists(IDS, "8:client:cr1")  # forgotten from an old entry
    assert await inspect.hexists(IDS, "8:client:cr11")
    meta, entries = await asyncio.to_thread(RedisHistory(redis_server.url, "wstally").kept)
    verdict, _note = verify_kept(meta, entries)
    assert verdict.ok, verdict.problem
    assert (verdict.rows, verdict.last_seq) == (11, 11)


async def test_history_reads_entries_of_any_size(engines: EngineFactory) -> None:
    # Entries of one update and of hundreds, mixed: the reads size themselves on both.
    engine = await engines()
    kept: list[Update] = []
    for size in [1] * 150 + [300, 1, 1, 250] + [1] * 150:
        kept += applied(await engine.submit([add(1, conn="c") for _ in range(size)]))
    assert len(kept) == 852
    assert await engine.history(0, 10_000) == kept
    for since, limit in [(0, 256), (140, 256), (151, 1), (449, 256), (700, 256), (851, 5)]:
        assert await engine.history(since, limit) == kept[since : since + limit]


async def test_history_reads_in_chunks(engines: EngineFactory) -> None:
    engine = await engines()
    applied: list[Update] = []
    for start in range(0, 2500, 500):
        results = await engine.submit([add(n, conn=f"c{n % 3}") for n in range(start, start + 500)])
        applied += [r for r in results if isinstance(r, Update)]
    assert await engine.history(0, 10_000) == applied
    assert await engine.history(999, 1500) == applied[999:2499]
    assert await engine.history(2400, 1000) == applied[2400:]
    assert await engine.history(2500, 10) == []
    assert await engine.history(0, 0) == []


# -- the feed ------------------------------------------------------------------------------


async def test_every_node_feed_sees_every_update_in_one_order(
    engines: EngineFactory, feeds: Callable[[RedisEngine], FeedReader]
) -> None:
    a = await engines(node="a")
    b = await engines(node="b")
    feed_a, feed_b = feeds(a), feeds(b)

    async def send(engine: RedisEngine, tag: str) -> list[Update]:
        applied = []
        for n in range(30):
            batch = [add(n, f"{tag}{n}-{k}", client=tag, conn=tag) for k in range(1 + n % 4)]
            applied += [r for r in await engine.submit(batch) if isinstance(r, Update)]
        return applied

    sent_a, sent_b = await asyncio.gather(send(a, "a"), send(b, "b"))
    last = len(sent_a) + len(sent_b)
    seen_a = await feed_a.until_seq(last)
    seen_b = await feed_b.until_seq(last)
    assert seen_a == seen_b == sorted(sent_a + sent_b, key=lambda u: u.seq)
    assert_gapless(seen_a)
    assert feed_a.resets() == feed_b.resets() == []


async def test_feed_carries_every_field_exactly(
    engines: EngineFactory, feeds: Callable[[RedisEngine], FeedReader]
) -> None:
    engine = await engines()
    reader = feeds(engine)
    batch = [
        Submission(3, "c1", 1_700_000_000.123456, "cliént 1", 'Zoë "z" \\ ', "id with spaces"),
        Submission(-2, "c2", 0.1, None, None, None),
        Submission(INT64_MAX - 1, "c3", 2.0, "", "", ""),  # empty strings are not None
    ]
    results = await engine.submit(batch)
    assert all(isinstance(r, Update) for r in results)
    assert await reader.until_seq(3) == results == await engine.history(0, 10)
    assert results[2] == Update(3, INT64_MAX - 1, INT64_MAX, 2.0, "c3", "", "", "")


async def test_a_late_feed_that_missed_trimmed_updates_resets(
    engines: EngineFactory, feeds: Callable[[RedisEngine], FeedReader]
) -> None:
    late = await engines(node="late")
    busy = await engines(node="busy", window=1, keep=1)
    for start in range(0, 1000, 100):
        await busy.submit([add(1) for _ in range(start, start + 100)])
    reader = feeds(late)
    updates = await reader.until_seq(1000)
    (reset,) = reader.resets()
    assert reader.events[0] is reset
    assert "no longer kept" in reset.reason
    first = updates[0]
    assert reset.position == Position(late.status()["epoch"], first.seq - 1, first.seq - 1)
    assert_gapless(updates, first=first.seq)


async def test_close_ends_the_feed_at_once(engines: EngineFactory) -> None:
    engine = await engines()
    reader = FeedReader(engine)
    await engine.submit([add(1)])
    await reader.until_seq(1)
    await asyncio.sleep(0.05)  # the follower is now blocked in XREAD
    start = time.monotonic()
    await engine.close()
    await asyncio.wait_for(reader.task, within(1))
    assert time.monotonic() - start < within(0.5)


async def test_close_is_quick_while_redis_is_down(
    redis_server: RedisServer, engines: EngineFactory
) -> None:
    engine = await engines()
    reader = FeedReader(engine)
    await engine.submit([add(1)])
    await reader.until_seq(1)
    redis_server.kill9()
    await asyncio.sleep(0.3)  # the follower lost its connection and waits to reconnect
    assert engine.status()["redis"] == "disconnected"
    start = time.monotonic()
    await engine.close()
    await asyncio.wait_for(reader.task, within(1))
    assert time.monotonic() - start < within(0.2)


# -- unknown outcomes ----------------------------------------------------------------------


class CuttingProxy:
    """A TCP proxy to Redis that can cut one connection around the next script call:
    before Redis sees it (never ran) or after Redis ran it, dropping the reply (ran, but
    the client cannot know)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = ""
        self.cut: str | None = None  # "request" or "reply"
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0"
        return self.url

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers += [writer, up_writer]
        doomed = asyncio.Event()
        for coro in (
            self._requests(reader, up_writer, writer, doomed),
            self._replies(up_reader, writer, up_writer, doomed),
        ):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _requests(
        self,
        reader: asyncio.StreamReader,
        up: asyncio.StreamWriter,
        down: asyncio.StreamWriter,
        doomed: asyncio.Event,
    ) -> None:
        while data := await reader.read(65536):
            if self.cut is not None and b"EVALSHA" in data:
                self.cuts += 1
                if self.cut == "request":
                    self.cut = None
                    _close(up, down)
                    return
                self.cut = None
                doomed.set()  # before Redis can answer
            up.write(data)
        _close(up, down)

    async def _replies(
        self,
        up_reader: asyncio.StreamReader,
        down: asyncio.StreamWriter,
        up: asyncio.StreamWriter,
        doomed: asyncio.Event,
    ) -> None:
        while data := await up_reader.read(65536):
            if doomed.is_set():
                break  # the script ran; its reply goes nowhere
            down.write(data)
        _close(up, down)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


def _close(*writers: asyncio.StreamWriter) -> None:
    for writer in writers:
        writer.close()


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[CuttingProxy]:
    proxy = CuttingProxy(redis_server.port)
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.mark.parametrize("cut", ["reply", "request"])
async def test_a_batch_cut_off_is_resent_and_applied_once(
    engines: EngineFactory,
    feeds: Callable[[RedisEngine], FeedReader],
    proxy: CuttingProxy,
    inspect: Redis,
    cut: str,
) -> None:
    engine = await engines(proxy.url)
    reader = feeds(await engines())  # straight to Redis
    await engine.submit([add(1)])
    proxy.cut = cut
    results = await engine.submit([add(10), add(20, "r1"), add(30)])  # id-less adds too
    assert proxy.cuts == 1
    assert [(r.seq, r.total) for r in results if isinstance(r, Update)] == [
        (2, 11),
        (3, 31),
        (4, 61),
    ]
    assert await inspect.hget(META, "seq") == "4"
    assert await inspect.xlen(LOG) == 2  # one entry per batch, the resend added none
    updates = await reader.until_seq(4)
    assert_gapless(updates)
    assert len(updates) == 4


async def test_the_same_batch_id_gets_the_stored_reply(
    engines: EngineFactory, inspect: Redis
) -> None:
    engine = await engines()
    batch = [add(1), add(2, "r"), add(INT64_MAX)]
    first = await engine.submit(batch)
    engine._batches -= 1  # what a resend after a lost reply does: the same batch id
    assert await engine.submit(batch) == first
    assert await inspect.hget(META, "seq") == "2"
    assert seqs(await engine.submit([add(1)])) == [3]


async def test_a_late_copy_of_an_older_batch_is_never_applied(
    engines: EngineFactory, inspect: Redis
) -> None:
    engine = await engines()
    await engine.submit([add(1)])
    await engine.submit([add(2)])
    engine._batches = 0  # batch 1 again, as if a copy held up in the network came in now
    with pytest.raises(EngineError) as caught:
        await engine.submit([add(1)])
    assert caught.value.code == "store_failed"
    assert await inspect.hget(META, "seq") == "2"


async def test_a_cancelled_submit_still_finishes_its_call(
    engines: EngineFactory, feeds: Callable[[RedisEngine], FeedReader], inspect: Redis
) -> None:
    engine = await engines()
    reader = feeds(engine)
    task = asyncio.create_task(engine.submit([add(1), add(2)]))
    await asyncio.sleep(0)  # the script is on its way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    results = await engine.submit([add(3)])
    assert seqs(results) == [3]  # after the cancelled batch, which was applied all the same
    assert_gapless(await reader.until_seq(3))
    assert await inspect.hget(META, "total") == "6"


async def test_the_feed_reconnects_after_its_connection_is_killed(
    engines: EngineFactory, feeds: Callable[[RedisEngine], FeedReader], inspect: Redis
) -> None:
    engine = await engines()
    reader = feeds(engine)
    await engine.submit([add(1), add(2)])
    await reader.until_seq(2)
    follower = engine._follower
    assert follower is not None
    assert follower.client_id is not None
    assert await inspect.client_kill_filter(_id=str(follower.client_id)) == 1
    await engine.submit([add(3)])
    await engine.submit([add(4), add(5)])
    updates = await reader.until_seq(5)
    assert_gapless(updates)
    assert reader.resets() == []


async def test_a_hung_redis_fails_the_batch_in_time_and_is_followed_again(
    redis_server: RedisServer,
    engines: EngineFactory,
    feeds: Callable[[RedisEngine], FeedReader],
) -> None:
    engine = await engines(unavailable_after=0.5)
    reader = feeds(engine)
    await engine.submit([add(1)])
    await reader.until_seq(1)
    redis_server.pause()
    try:
        start = time.monotonic()
        with pytest.raises(EngineError) as caught:
            await engine.submit([add(10)])  # sent, then no answer: outcome unknown
        assert time.monotonic() - start < 0.5 + within(1)
        assert caught.value.transient
        assert engine.status()["redis"] == "disconnected"
    finally:
        redis_server.resume()
    (last,) = applied(await engine.submit([add(100)]))
    # The unanswered batch ran when Redis woke up (before this one), or never: either way once.
    updates = await reader.until_seq(last.seq)
    assert_gapless(updates)
    assert [u.delta for u in updates] in ([1, 10, 100], [1, 100])


# -- Redis killed, restarted, emptied ------------------------------------------------------


async def test_redis_killed_then_restarted_from_its_aof(
    redis_server: RedisServer,
    engines: EngineFactory,
    feeds: Callable[[RedisEngine], FeedReader],
) -> None:
    with logged("info") as logs:
        engine = await engines(unavailable_after=0.5)
        reader = feeds(engine)
        before = await engine.submit([add(n) for n in range(1, 11)])
        await reader.until_seq(10)

        redis_server.kill9()
        start = time.monotonic()
        with pytest.raises(EngineError) as caught:
            await engine.submit([add(100, "during")])
        assert time.monotonic() - start < 0.5 + within(1)
        assert caught.value.code == "unavailable"
        assert caught.value.transient
        status = engine.status()
        assert status["redis"] == "disconnected"
        assert "degraded" in status

        redis_server.restart()
        after = await engine.submit([add(100, "during"), add(5)])
        updates = await reader.until_seq(12)
    assert seqs(before + after) == list(range(1, 13))
    assert updates == before + after
    assert reader.resets() == []
    assert engine.status()["redis"] == "connected"
    assert "degraded" not in engine.status()
    events = [e["event"] for e in logs]
    assert events.count("engine.disconnected") == 1
    assert events.count("engine.reconnected") == 1


async def test_redis_restarted_empty_resets_the_feed(
    redis_server: RedisServer,
    engines: EngineFactory,
    feeds: Callable[[RedisEngine], FeedReader],
) -> None:
    engine = await engines()
    old = engine.status()["epoch"]
    reader = feeds(engine)
    await engine.submit([add(5), add(6)])
    await reader.until_seq(2)

    redis_server.restart_empty()
    await reader.until(reader.resets)
    (reset,) = reader.resets()
    assert reset.position.epoch != old
    assert (reset.position.seq, reset.position.total) == (0, 0)
    status = engine.status()
    assert status["epoch"] == reset.position.epoch
    assert status["resets"] == 1
    assert "new history" in status["last_reset"]

    results = await engine.submit([add(7)])
    assert [(r.seq, r.total) for r in results if isinstance(r, Update)] == [(1, 7)]
    await reader.until(lambda: len(reader.events) >= 3)
    assert reader.events[-1] == Published(applied(results))


async def test_a_batch_meeting_a_new_history_is_refused_until_the_feed_resets(
    redis_server: RedisServer,
    engines: EngineFactory,
    inspect: Redis,
) -> None:
    engine = await engines()
    feed = engine.feed()
    first = await engine.submit([add(5)])
    assert await asyncio.wait_for(anext(feed), within(5)) == Published(applied(first))

    redis_server.restart_empty()
    for _ in range(2):  # refused for as long as the feed's reader has not seen the Reset
        with pytest.raises(EngineError) as caught:
            await engine.submit([add(1)])
        assert caught.value.code == "unavailable"
        assert caught.value.transient
        assert "new history" in caught.value.message
    assert await inspect.hget(META, "seq") == "0"  # nothing applied

    event = await asyncio.wait_for(anext(feed), within(5))
    assert isinstance(event, Reset)
    results = await engine.submit([add(1)])
    assert seqs(results) == [1]
    assert await asyncio.wait_for(anext(feed), within(5)) == Published(applied(results))
    await engine.close()
    assert [e async for e in feed] == []


async def test_without_a_feed_the_next_batch_applies_to_the_new_history(
    redis_server: RedisServer, engines: EngineFactory
) -> None:
    engine = await engines()
    await engine.submit([add(5)])
    redis_server.restart_empty()
    with pytest.raises(EngineError):
        await engine.submit([add(1)])
    results = await engine.submit([add(1)])
    assert seqs(results) == [1]
    assert await engine.history(0, 10) == results
