"""When the store cannot commit, /healthz says so (503 with the reason) and adds are refused;
a database file deleted or replaced under a running server is noticed within a second; the
one-server lock sees through symlinks. Real sockets, and real processes for real faults."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

from helpers import GatedStore, OpenClient, ServerFactory, http_get, within
from servers import ServeProcess
from wstally.engine.local import CHECK_INTERVAL
from wstally.store import SQLiteStore

SECRET = "h3alth-s3cret-value"
DETAILS = {"seq", "total", "clients", "epoch", "lagging", "evicted", "engine"}


async def healthz(port: int, query: str = "", *headers: str) -> tuple[int, dict[str, Any]]:
    """GET /healthz with extra header lines: the status code and the JSON body."""
    status, _, raw = await http_get(port, f"/healthz{query}", *headers)
    body: dict[str, Any] = json.loads(raw)
    return status, body


async def test_failing_commits_make_healthz_degraded_until_one_succeeds(
    make_server: ServerFactory, open_client: OpenClient
) -> None:
    store = GatedStore()
    server = await make_server(store=store)
    client = await open_client(server.url, {"client": "c"})
    assert (await client.add(10, "a"))["type"] == "ack"
    status, body = await healthz(server.port)
    assert (status, body["status"], "reason" in body) == (200, "ok", False)

    store.fail = True
    assert (await client.add(5, "b"))["code"] == "store_failed"
    status, body = await healthz(server.port)
    assert status == 503
    assert body["status"] == "degraded"
    assert body["reason"] == "commit failed: [Errno 28] No space left on device"
    assert (body["seq"], body["total"]) == (1, 10)
    # Idle checks do not clear it: only a good commit says the store works again.
    await asyncio.sleep(CHECK_INTERVAL * 2)
    assert (await healthz(server.port))[0] == 503

    store.fail = False
    assert (await client.add(5, "b"))["seq"] == 2
    status, body = await healthz(server.port)
    assert (status, body["status"], "reason" in body) == (200, "ok", False)
    assert (body["seq"], body["total"]) == (2, 15)


async def test_healthz_details_are_for_holders_of_the_token(
    make_server: ServerFactory, open_client: OpenClient
) -> None:
    store = GatedStore()
    server = await make_server(store=store, token=SECRET)
    port = server.port
    # Anyone (a load balancer's probe): the status only.
    assert await healthz(port) == (200, {"status": "ok"})
    assert await healthz(port, "?token=wrong") == (200, {"status": "ok"})
    assert await healthz(port, "", "Authorization: Bearer wrong") == (200, {"status": "ok"})
    assert await healthz(port, "", f"Authorization: Basic {SECRET}") == (200, {"status": "ok"})
    # The token, either way a client may present it: everything.
    for query, headers in (("", (f"Authorization: Bearer {SECRET}",)), (f"?token={SECRET}", ())):
        status, body = await healthz(port, query, *headers)
        assert status == 200
        assert set(body) == {"status", *DETAILS}
        assert body["epoch"] == server.position.epoch

    client = await open_client(server.url + f"?token={SECRET}", {"client": "c"})
    store.fail = True
    assert (await client.add(1, "x"))["code"] == "store_failed"
    # The reason names files and errors: also only for holders of the token.
    assert await healthz(port) == (503, {"status": "degraded"})
    status, body = await healthz(port, f"?token={SECRET}")
    assert status == 503
    assert set(body) == {"status", "reason", *DETAILS}
    assert "No space left on device" in body["reason"]


async def test_real_io_errors_in_a_serve_process_degrade_it_until_a_commit_succeeds(
    serve: Any, tmp_path: Path, open_client: OpenClient
) -> None:
    server: ServeProcess = serve("--port", "0", "--db", "tally.db")
    client = await open_client(server.url, {"client": "c"})
    assert (await client.add(1, "a"))["seq"] == 1
    # A real write error: the server's file size limit lowered to what its WAL holds now,
    # so the next commit's write fails with EFBIG (Python ignores SIGXFSZ).
    pid = server.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, ((tmp_path / "tally.db-wal").stat().st_size, hard))
    try:
        refused = await client.add(2, "b")
        assert refused["code"] == "store_failed"
        status, body = await healthz(server.port)
        assert (status, body["status"]) == (503, "degraded")
        assert body["reason"] == "commit failed: disk I/O error"
        assert (body["seq"], body["total"]) == (1, 1)
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
    assert (await client.add(2, "b"))["seq"] == 2
    status, body = await healthz(server.port)
    assert (status, body["status"], body["total"]) == (200, "ok", 3)
    await client.close()
    assert server.stop() == 0
    assert server.event("store.commit_failed")["error"] == "disk I/O error"


async def wait_for_event(server: ServeProcess, name: str, units: float) -> float:
    """Seconds until ``server`` logged ``name``; fails after ``units``."""
    started = time.monotonic()
    while not any(e.get("event") == name for e in server.events):
        assert time.monotonic() - started < within(units), f"no {name} in {server.raw}"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_deleting_the_database_is_noticed_refused_and_nothing_acked_is_lost(
    serve: Any, tmp_path: Path, open_client: OpenClient
) -> None:
    db = tmp_path / "tally.db"
    server: ServeProcess = serve("--port", "0", "--db", "tally.db")
    client = await open_client(server.url, {"client": "c"})
    acks = [await client.add(n, f"a{n}") for n in range(1, 31)]
    assert [a["seq"] for a in acks] == list(range(1, 31))

    # Idle: no add comes to find out, and still the server notices within a second.
    db.unlink()
    assert await wait_for_event(server, "store.file_lost", units=1) < within(1)
    lost = server.event("store.file_lost")
    assert lost["level"] == "error"
    assert lost["logger"] == "wstally.store"
    assert (lost["path"], lost["reason"], lost["rescue_error"]) == ("tally.db", "was deleted", None)
    rescued = Path(lost["rescued"])
    assert rescued.parent == tmp_path
    assert rescued.name.startswith("tally.db.rescued-")

    status, body = await healthz(server.port)
    assert (status, body["status"], body["seq"]) == (503, "degraded", 30)
    assert "tally.db was deleted while in use; restart the server" in body["reason"]
    assert str(rescued) in body["reason"]
    # From now on nothing is acked: every add is refused, none is counted.
    for n in range(31, 36):
        assert (await client.add(n, f"a{n}"))["code"] == "store_failed"
    assert (await healthz(server.port))[1]["total"] == sum(range(1, 31))
    await client.close()
    assert server.stop() == 0
    assert server.event("server.stopped")["seq"] == 30
    # The WAL left at the path is empty: nothing of ours can be replayed into another file.
    wal = tmp_path / "tally.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0

    # The operator puts the rescued copy back and restarts: every acked update is there,
    # with its id (a resend is a duplicate), and the refused ones are not.
    os.replace(rescued, db)
    again: ServeProcess = serve("--port", "0", "--db", "tally.db")
    assert again.port
    started = again.event("server.started")
    assert (started["seq"], started["total"]) == (30, sum(range(1, 31)))
    client = await open_client(again.url, {"client": "c"})
    resent = await client.add(7, "a7")
    assert (resent["seq"], resent.get("duplicate")) == (7, True)
    assert (await client.add(31, "a31"))["seq"] == 31
    await client.close()
    assert again.stop() == 0
    reader = SQLiteStore(db, readonly=True)
    try:
        stored = [(u.seq, u.total, u.req_id) for u in reader.history()]
    finally:
        reader.close()
    assert stored[:30] == [(a["seq"], a["total"], a["id"]) for a in acks]


async def test_replacing_the_database_is_noticed_and_the_new_file_is_left_alone(
    make_server: ServerFactory, tmp_path: Path, open_client: OpenClient
) -> None:
    server = await make_server()
    client = await open_client(server.url, {"client": "c"})
    assert (await client.add(4, "a"))["seq"] == 1
    other = SQLiteStore(tmp_path / "other.db")
    epoch = other.load(10).epoch
    other.close()
    os.replace(tmp_path / "other.db", tmp_path / "tally.db")
    started = time.monotonic()
    while server.engine.status().get("degraded") is None:
        assert time.monotonic() - started < within(1)
        await asyncio.sleep(0.01)
    assert "was replaced by another file" in server.engine.status()["degraded"]
    assert (await client.add(1, "b"))["code"] == "store_failed"
    await client.close()
    await server.stop()
    reopened = SQLiteStore(tmp_path / "tally.db")
    try:
        state = reopened.load(10)
        assert (state.epoch, state.seq) == (epoch, 0)
    finally:
        reopened.close()


def test_a_symlinked_path_cannot_serve_a_database_already_served(
    serve: Any, tmp_path: Path
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "link.db").symlink_to(tmp_path / "data" / "real.db")
    (tmp_path / "linkdir").symlink_to(tmp_path / "data")
    first: ServeProcess = serve("--port", "0", "--db", "data/real.db")
    assert first.port
    for other in ("link.db", "linkdir/real.db"):
        second: ServeProcess = serve("--port", "0", "--db", other)
        assert second.wait() == 1
        assert "in use by another wstally server" in second.event("server.failed")["error"]
    assert first.stop() == 0
    # The other way round: the symlink first, the real path refused.
    first = serve("--port", "0", "--db", "link.db")
    assert first.port
    second = serve("--port", "0", "--db", "data/real.db")
    assert second.wait() == 1
    assert "in use by another wstally server" in second.event("server.failed")["error"]
    assert first.stop() == 0
