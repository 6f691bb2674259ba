"""``wstally history --redis``: the history the nodes share, read-only, and ``--verify``.

A private redis-server per test (never the shared 6379), real ``wstally serve --redis``
processes or Redis engines in-process to write, and ``wstally history`` as a subprocess to
read; a tampering client edits the stream and the meta hash behind the engine's back.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from helpers import JsonClient, within
from redisproc import RedisServer
from servers import ServeProcess
from wstally import cli, logsetup
from wstally.engine.base import Submission
from wstally.engine.redis import RedisEngine, history_keys
from wstally.history import verify_kept
from wstally.redis_history import RedisHistory
from wstally.store import SQLiteStore
from wstally.tally import Update

META, LOG, _IDS = history_keys("wstally")
AT = 1795514400.25  # 2026-11-24T10:00:00.250Z

EngineFactory = Callable[..., Awaitable[RedisEngine]]


def history_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``wstally history`` in its own process, as an operator runs it beside the nodes."""
    return subprocess.run(
        [sys.executable, "-m", "wstally", "history", *args],
        capture_output=True,
        text=True,
        timeout=within(20),
        env={**os.environ, **(env or {})},
    )


def run(monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[int, str, str]:
    """``wstally history`` in this process (for the many small cases): code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    code = cli.main(["history", *argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    logsetup.configure("json", os.environ.get("WSTALLY_TEST_LOG_LEVEL", "warning"))


@pytest.fixture
def tamper(redis_server: RedisServer) -> Iterator[Redis]:
    """A plain client to look at, or tamper with, what the engine keeps in Redis."""
    client = Redis.from_url(redis_server.url, decode_responses=True, protocol=2)
    yield client
    client.close()


@pytest.fixture
async def engines(redis_server: RedisServer) -> AsyncIterator[EngineFactory]:
    opened: list[RedisEngine] = []

    async def make(**options: Any) -> RedisEngine:
        engine = RedisEngine(redis_server.url, **options)
        opened.append(engine)
        await engine.open()
        return engine

    yield make
    for engine in opened:
        await engine.close()


def add(n: int, **fields: Any) -> Submission:
    fields.setdefault("conn", f"conn-{n % 3}")
    return Submission(n, at=AT + n, **fields)


async def write(engine: RedisEngine, count: int, per_batch: int = 1) -> list[Update]:
    """``count`` updates with deltas 1..count; ann sends the odd ones (with ids)."""
    applied: list[Update] = []
    for start in range(1, count + 1, per_batch):
        batch = [
            add(n, client="c-ann", name="ann", req_id=f"r{n}") if n % 2 else add(n)
            for n in range(start, min(start + per_batch, count + 1))
        ]
        applied += [r for r in await engine.submit(batch) if isinstance(r, Update)]
    return applied


def dump(client: Redis) -> dict[str, Any]:
    """Every key and its serialized value: equal dumps, nothing was written."""
    return {key: client.dump(key) for key in client.scan_iter()}


def rewrite(client: Redis, seq: int, **changes: str) -> None:
    """Tamper with a kept update: a stream entry cannot be edited, so write the stream anew.

    ``changes`` name an entry's fields of one update (s, d, t as JSON): in a batch entry
    they change that update's item.
    """
    entries: Any = client.xrange(LOG)  # redis-py types it as optional
    client.delete(LOG)
    for entry_id, fields in entries:
        if "u" in fields:
            items = json.loads(fields["u"])
            for item in items:
                if item[0] == seq:
                    for name, value in changes.items():
                        item["sdt".index(name)] = json.loads(value)
            fields = {**fields, "u": json.dumps(items)}
        elif entry_id == f"{seq}-0":
            fields = {**fields, **changes}
        client.xadd(LOG, fields, id=entry_id)


def kept_updates(client: Redis) -> int:
    """How many updates the stream keeps (one entry per batch)."""
    entries: Any = client.xrange(LOG)
    return sum(len(json.loads(fields["u"])) for _, fields in entries)


# -- against a real node ------------------------------------------------------------------


async def test_lists_and_verifies_what_a_node_wrote(
    redis_server: RedisServer,
    serve: Callable[..., ServeProcess],
    clients: list[JsonClient],
    tamper: Redis,
) -> None:
    # Before any node: nothing to read, and reading creates nothing (no epoch, no key).
    empty = history_cli("--redis", redis_server.url, "--verify")
    assert empty.returncode == 2
    assert "no wstally history under prefix 'wstally'" in empty.stderr
    assert tamper.dbsize() == 0

    node = serve("--port", "0", "--redis", redis_server.url, "--node", "a")
    client = await JsonClient.connect(node.url, {"client": "c-live", "name": "liv"})
    clients.append(client)
    for i in range(20):
        assert (await client.add(i, f"l{i}"))["type"] == "ack"

    before = dump(tamper)
    verified = history_cli("--redis", redis_server.url, "--verify")
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("OK: 20 updates, seq 1..20, total 190: ")
    assert "(epoch " in verified.stdout
    assert "no longer kept" not in verified.stdout  # the whole history is still in Redis
    listed = history_cli("--redis", redis_server.url, "--json", "--tail", "2")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["seq"], r["delta"], r["total"], r["client"], r["name"]) for r in rows] == [
        (19, 18, 171, "c-live", "liv"),
        (20, 19, 190, "c-live", "liv"),
    ]
    assert rows[0]["req_id"] == "l18"
    assert dump(tamper) == before  # read-only: not one key added or changed

    # The node goes on writing; a tampering client appends an entry with a wrong total.
    assert (await client.add(10, "after"))["total"] == 200
    epoch = tamper.hget(META, "epoch")
    tamper.xadd(LOG, _forged(str(epoch), 22, 5, 999), id="22-0")
    failed = history_cli("--redis", redis_server.url, "--verify")
    assert failed.returncode == 1
    assert failed.stdout.startswith(
        "FAIL: seq 22: total is 999, expected 205 (total 200 at seq 21 + delta 5); "
        "21 row(s) before it were consistent"
    ), failed.stdout


# -- tampering, one inconsistency at a time ---------------------------------------------


def _forged(epoch: str, seq: int, delta: int, total: int) -> dict[Any, Any]:
    payload = json.dumps([AT, "forged", None, None, None])
    return {"e": epoch, "s": str(seq), "d": str(delta), "t": str(total), "k": "", "p": payload}


def _forged_batch(epoch: str, *updates: tuple[int, int, int]) -> dict[Any, Any]:
    items = [[seq, delta, total, AT, "forged", None, None, None] for seq, delta, total in updates]
    return {"e": epoch, "u": json.dumps(items), "k": ""}


Tamper = Callable[[Redis, str], Any]

TAMPERINGS: list[tuple[str, Tamper, str]] = [
    (
        "a consistent entry the meta hash does not count",
        lambda r, e: r.xadd(LOG, _forged(e, 11, 1, 56), id="11-0"),
        "the stream ends at seq 11 (total 56), but the meta hash says seq 10 (total 55)",
    ),
    (
        "the meta total changed",
        lambda r, e: r.hset(META, "total", "54"),
        "the stream ends at seq 10 (total 55), but the meta hash says seq 10 (total 54)",
    ),
    # Batches of 3: the entry of seqs 4 to 6 is stored under 6-0.
    ("an entry deleted", lambda r, e: r.xdel(LOG, "6-0"), "seq 7: expected seq 4 after 3"),
    (
        "an entry of another epoch",
        lambda r, e: r.xadd(LOG, _forged("0" * 16, 11, 1, 56), id="11-0"),
        "seq 11: an entry of epoch '0000000000000000', not the meta hash's",
    ),
    (
        "an entry stored under another id",
        lambda r, e: r.xadd(LOG, _forged(e, 11, 1, 56), id="12-0"),
        "seq 11: stored under the entry id 12-0, not 11-0",
    ),
    (
        "a delta that is no number",
        lambda r, e: r.xadd(LOG, {**_forged(e, 11, 1, 56), "d": "ten"}, id="11-0"),
        "seq 11: delta 'ten' is not a 64-bit integer",
    ),
    (
        "a payload that is no JSON",
        lambda r, e: r.xadd(LOG, {**_forged(e, 11, 1, 56), "p": "[1,"}, id="11-0"),
        "seq 11: time None is not a number",
    ),
    (
        "a batch entry stored under another id than its last seq",
        lambda r, e: r.xadd(LOG, _forged_batch(e, (11, 1, 56), (12, 1, 57)), id="13-0"),
        "seq 12: stored under the entry id 13-0, not 12-0",
    ),
    (
        "a batch entry with a gap inside",
        lambda r, e: r.xadd(LOG, _forged_batch(e, (11, 1, 56), (13, 1, 57)), id="13-0"),
        "seq 13: expected seq 12 after 11",
    ),
    (
        "a batch entry whose updates are no JSON",
        lambda r, e: r.xadd(LOG, {"e": e, "u": "[[11,", "k": ""}, id="11-0"),
        "after seq 10: seq None is not an integer",
    ),
    ("the meta epoch gone", lambda r, e: r.hdel(META, "epoch"), "the meta hash holds no epoch"),
    (
        "the meta hash gone",
        lambda r, e: r.delete(META),
        "the meta hash is missing, but the stream keeps 10 entries",
    ),
]


@pytest.mark.parametrize(
    ("how", "tampering", "problem"), TAMPERINGS, ids=[t[0] for t in TAMPERINGS]
)
async def test_verify_names_the_first_inconsistency(
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
    engines: EngineFactory,
    tamper: Redis,
    how: str,
    tampering: Tamper,
    problem: str,
) -> None:
    engine = await engines()
    await write(engine, 10, per_batch=3)
    assert run(monkeypatch, "--redis", redis_server.url, "--verify")[0] == 0
    tampering(tamper, str(tamper.hget(META, "epoch")))
    code, out, _ = run(monkeypatch, "--redis", redis_server.url, "--verify")
    assert code == 1, how
    assert out.startswith(f"FAIL: {problem}"), out
    assert len(out.splitlines()) == 1


# -- the stream keeps the last updates only ----------------------------------------------


async def test_verify_starts_from_the_first_kept_entry(
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
    engines: EngineFactory,
    tamper: Redis,
) -> None:
    engine = await engines(keep=10, window=3)
    applied = await write(engine, 400, per_batch=7)
    kept = kept_updates(tamper)
    assert 10 <= kept < 400  # trimmed (in whole stream nodes: "~")
    first = applied[-kept]
    base = f"{first.total - first.delta} at seq {first.seq - 1}"

    code, out, _ = run(monkeypatch, "--redis", redis_server.url, "--verify")
    assert code == 0, out
    assert out.startswith(f"OK: {kept} updates, seq {first.seq}..400, total {applied[-1].total}")
    assert (
        f"; updates before seq {first.seq} are no longer kept in Redis: the chain starts "
        f"from the first kept entry's total minus its delta, {base} (epoch "
    ) in out
    # --since older than what is kept: the same, said the same way.
    assert run(monkeypatch, "--redis", redis_server.url, "--verify", "--since", "3")[1] == out
    code, out, _ = run(monkeypatch, "--redis", redis_server.url, "--verify", "--since", "395")
    assert (code, out.split(":")[0:2]) == (0, ["OK", " 5 updates, seq 396..400, total 80200"])
    code, out, _ = run(monkeypatch, "--redis", redis_server.url, "--verify", "--since", "401")
    assert (code, out.split(";")[0]) == (1, "FAIL: no row at seq 401 to start from")

    # The first kept entry is the starting point: a total changed in the next is caught.
    rewrite(tamper, first.seq + 1, t="1")
    code, out, _ = run(monkeypatch, "--redis", redis_server.url, "--verify")
    assert code == 1
    assert out.startswith(f"FAIL: seq {first.seq + 1}: total is 1, expected "), out


async def test_verify_beside_nodes_that_write_and_trim(
    redis_server: RedisServer, engines: EngineFactory
) -> None:
    # Entries leave the stream while it is read: reading newest first, in small chunks,
    # the verifier still sees one unbroken run of entries, never a gap that is not one.
    engine = await engines(keep=50, window=5)
    await write(engine, 300, per_batch=5)
    stop = asyncio.Event()

    async def keep_writing() -> int:
        n = 0
        while not stop.is_set():
            await engine.submit([add(1, conn="busy")])
            n += 1
        return n

    writer = asyncio.create_task(keep_writing())
    source = RedisHistory(redis_server.url, "wstally", chunk=7)
    try:
        for _ in range(20):
            meta, entries = await asyncio.to_thread(source.kept)
            verdict, note = verify_kept(meta, entries)
            assert verdict.ok, verdict.problem
            assert entries[0].row[0] > 1
            assert "no longer kept" in note
    finally:
        stop.set()
        assert await writer > 0
        source.close()


# -- listing in chunks -------------------------------------------------------------------


async def test_rows_read_in_chunks_select_like_the_sqlite_rows(
    redis_server: RedisServer, engines: EngineFactory, tmp_path: Path
) -> None:
    engine = await engines()
    applied = await write(engine, 50, per_batch=4)
    sqlite = SQLiteStore(tmp_path / "same.db")
    sqlite.load(window=10)
    sqlite.commit(applied)
    source = RedisHistory(redis_server.url, "wstally", chunk=4)
    try:
        for since, client, tail in [
            (0, None, None),
            (13, None, None),
            (0, "c-ann", None),
            (0, "ann", 5),
            (0, None, 9),
            (40, None, 100),
            (50, None, None),
            (7, "c-ann", 3),
            (0, "nobody", None),
        ]:
            expected = list(sqlite.rows(since, client, tail))
            assert list(source.rows(since, client, tail)) == expected, (since, client, tail)
    finally:
        source.close()
        sqlite.close()


async def test_a_prefix_selects_one_tally(
    monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer, engines: EngineFactory
) -> None:
    await write(await engines(prefix="one"), 3)
    await write(await engines(prefix="two"), 5)
    code, out, _ = run(monkeypatch, "--redis", redis_server.url, "--redis-prefix", "two")
    assert (code, len(out.splitlines())) == (0, 5)
    code, out, _ = run(
        monkeypatch, "--redis", redis_server.url, "--redis-prefix", "one", "--verify"
    )
    assert (code, out.split(",")[0]) == (0, "OK: 3 updates")
    code, _, err = run(monkeypatch, "--redis", redis_server.url)  # the default: wstally
    assert code == 2
    assert "no wstally history under prefix 'wstally'" in err


# -- the command line ---------------------------------------------------------------------


def test_redis_and_db_are_exclusive(tmp_path: Path) -> None:
    both = history_cli("--db", str(tmp_path / "x.db"), "--redis", "redis://127.0.0.1:1/0")
    assert both.returncode == 2
    assert "argument --redis: not allowed with argument --db" in both.stderr
    bad = history_cli("--redis", "http://127.0.0.1:1/")
    assert bad.returncode == 2
    assert "is not a Redis URL" in bad.stderr


def test_db_given_beats_the_redis_of_the_environment(tmp_path: Path) -> None:
    # WSTALLY_REDIS set for the nodes must not hijack an explicit --db.
    env = {"WSTALLY_REDIS": "redis://127.0.0.1:1/0"}
    listed = history_cli("--db", str(tmp_path / "missing.db"), env=env)
    assert listed.returncode == 2
    assert "no database at" in listed.stderr
    from_env = history_cli(env=env)
    assert from_env.returncode == 2
    assert "cannot read Redis at redis://127.0.0.1:1/0" in from_env.stderr


def test_an_unreachable_redis_is_named_without_its_password() -> None:
    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    failed = history_cli("--redis", "redis://:s3cret@127.0.0.1:1/0", "--verify")
    assert failed.returncode == 2
    assert "wstally history: error: cannot read Redis at redis://:***@127.0.0.1:1/0" in (
        failed.stderr
    )
    assert "s3cret" not in failed.stderr
