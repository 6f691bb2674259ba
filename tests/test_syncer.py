"""The fsync helper process (store/syncer.py): real processes, real files, real signals."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from helpers import OpenClient, within
from servers import ServeProcess
from wstally import logsetup
from wstally.engine.base import EngineError, Submission
from wstally.engine.local import SYNC_FAILED, LocalEngine
from wstally.store import SQLiteStore
from wstally.store.syncer import Syncer, SyncError, SyncUnavailable
from wstally.tally import Update


def state(pid: int) -> str | None:
    """The process's state letter (Z: a zombie), or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rpartition(")")[2].split()[0]


@pytest.fixture
def wal(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """An open file standing for a WAL: its descriptor (the witness) and path."""
    path = tmp_path / "data"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    yield fd, str(path)
    os.close(fd)


def syncer_for(wal: tuple[int, str], **kwargs: Any) -> Syncer:
    fd, path = wal
    return Syncer(fd, path, path + ".db", **kwargs)


async def gone(pid: int) -> None:
    async with asyncio.timeout(within(5)):
        while state(pid) not in (None, "Z"):  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.01)


async def test_syncs_are_answered_in_order_and_close_ends_the_helper(
    wal: tuple[int, str],
) -> None:
    syncer = syncer_for(wal)
    os.write(wal[0], b"x" * 4096)
    await asyncio.wait_for(syncer.sync(), within(5))
    pid = syncer.pid
    assert pid is not None
    assert state(pid) in ("S", "R", "D")
    # Many at once, as commits never are but a burst might be: each is answered, in order.
    done: list[int] = []

    async def one(i: int) -> None:
        os.write(wal[0], b"y")
        await syncer.sync()
        done.append(i)

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(50))), within(5))
    assert done == list(range(50))
    assert syncer.pid == pid  # the same helper all along
    syncer.close()
    assert syncer.pid is None
    await gone(pid)
    with pytest.raises(SyncUnavailable):
        await syncer.sync()


async def test_a_failing_fdatasync_raises_and_says_why(tmp_path: Path) -> None:
    # fdatasync on a pipe fails with EINVAL: the helper reports it, it does not die.
    read_end, write_end = os.pipe()
    syncer = Syncer(read_end, "", str(tmp_path / "none.db"))
    try:
        with pytest.raises(SyncError, match="fdatasync failed: 22 Invalid argument"):
            await asyncio.wait_for(syncer.sync(), within(5))
        pid = syncer.pid
        with pytest.raises(SyncError, match="Invalid argument"):
            await asyncio.wait_for(syncer.sync(), within(5))
        assert syncer.pid == pid
        assert syncer.restarts == 0
    finally:
        syncer.close()
        os.close(read_end)
        os.close(write_end)


async def test_a_helper_killed_is_stood_in_for_by_the_witness_then_replaced(
    wal: tuple[int, str],
) -> None:
    syncer = syncer_for(wal)
    try:
        await asyncio.wait_for(syncer.sync(), within(5))
        first = syncer.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        with capture_logs() as logs:
            # Asked of a helper that died: the store's own descriptor is fsynced instead
            # (a failure the helper saw and took with it would be reported there).
            await asyncio.wait_for(syncer.sync(), within(5))
            assert syncer.pid is None
            await gone(first)  # reaped, not left a zombie
            assert state(first) is None
            # The next sync starts a new helper, and says so.
            await asyncio.wait_for(syncer.sync(), within(5))
        assert syncer.pid not in (None, first)
        assert syncer.restarts == 1
        [restarted] = [e for e in logs if e["event"] == "store.syncer_restarted"]
        assert restarted == {
            "event": "store.syncer_restarted",
            "log_level": "warning",
            "pid": syncer.pid,
            "exit_code": -signal.SIGKILL,
        }
    finally:
        syncer.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_sigint_and_sigterm_leave_the_helper_running(
    wal: tuple[int, str], signum: int
) -> None:
    # A Ctrl-C in the server's terminal, or a service manager's stop, reaches every
    # process of the group: the server drains on it, and its last commits need fsyncs.
    syncer = syncer_for(wal)
    try:
        await asyncio.wait_for(syncer.sync(), within(5))
        pid = syncer.pid
        assert pid is not None
        os.killpg(os.getpgid(pid), 0)  # (the helper is in our group, as with a server)
        os.kill(pid, signum)
        for _ in range(20):
            await asyncio.wait_for(syncer.sync(), within(5))
        assert state(pid) in ("S", "R", "D")
        assert (syncer.pid, syncer.restarts) == (pid, 0)
    finally:
        syncer.close()


async def test_close_with_a_sync_outstanding_fails_it_and_starts_no_helper(
    wal: tuple[int, str],
) -> None:
    syncer = syncer_for(wal)
    await asyncio.wait_for(syncer.sync(), within(5))
    pid = syncer.pid
    assert pid is not None
    waiting = asyncio.create_task(syncer.sync())
    await asyncio.sleep(0)  # asked; its answer not read yet
    syncer.close()
    with pytest.raises(SyncUnavailable):
        await asyncio.wait_for(waiting, within(5))
    assert syncer.pid is None
    assert syncer.restarts == 0
    await gone(pid)


async def test_a_helper_that_cannot_start_is_unavailable(wal: tuple[int, str]) -> None:
    syncer = syncer_for(wal, executable="/nonexistent/python3")
    with pytest.raises(SyncUnavailable, match="cannot start the fsync helper"):
        await syncer.sync()


async def test_helpers_that_stop_before_answering_make_the_syncer_unavailable(
    wal: tuple[int, str],
) -> None:
    # An interpreter that exits at once (broken, say): each sync is vouched for by the
    # witness, but after two such helpers in a row there is no helper to be had.
    syncer = syncer_for(wal, executable=shutil.which("true") or "/bin/true")
    try:
        assert await asyncio.wait_for(syncer.sync(), within(5)) is False
        assert await asyncio.wait_for(syncer.sync(), within(5)) is False
        with pytest.raises(SyncUnavailable, match="stops before it answers"):
            await syncer.sync()
    finally:
        syncer.close()


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


async def test_a_serve_process_commits_through_its_helper_and_takes_it_down_when_killed(
    serve: Callable[..., ServeProcess], open_client: OpenClient
) -> None:
    server = serve("--port", "0", "--db", "tally.db")
    client = await open_client(server.url, {"client": "c"})
    assert (await client.add(1, "a"))["seq"] == 1
    [helper] = children(server.proc.pid)
    assert "fdatasync" in Path(f"/proc/{helper}/cmdline").read_text()  # noqa: ASYNC240
    # The helper killed under load: every add is still acked, in order, and a new one
    # answers (logged).
    for n in range(200):
        await client.send({"type": "add", "delta": 1, "id": f"b{n}"})
        if n == 50:
            os.kill(helper, signal.SIGKILL)
    acks: list[int] = []
    while len(acks) < 200:
        frame = await client.recv()
        assert frame["type"] != "error", frame
        if frame["type"] == "ack":
            acks.append(frame["seq"])
    assert acks == list(range(2, 202))
    [replacement] = children(server.proc.pid)
    assert replacement != helper
    assert server.health()["total"] == 201
    # SIGKILL to the server: its helper sees the request pipe close and exits.
    server.proc.kill()
    server.wait()
    async with asyncio.timeout(within(5)):
        while state(replacement) not in (None, "Z"):  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.02)
    assert any(e.get("event") == "store.syncer_restarted" for e in server.events)


async def engine_on(tmp_path: Path) -> LocalEngine:
    engine = LocalEngine(SQLiteStore(tmp_path / "tally.db"))
    await engine.open()
    assert engine.store.description.startswith("sqlite:")
    return engine


def add(n: int, req_id: str) -> Submission:
    return Submission(n, "c", 0.0, "a", None, req_id)


async def test_a_failed_fsync_refuses_the_batch_and_every_commit_after_it(
    tmp_path: Path,
) -> None:
    engine = await engine_on(tmp_path)
    [result] = await engine.submit([add(5, "1")])
    assert isinstance(result, Update)
    assert result.seq == 1
    # A disk that fails its fsync: the helper's fdatasync pointed at a pipe (EINVAL), a
    # real failure from a real helper.
    read_end, write_end = os.pipe()
    failing = Syncer(read_end, "", str(tmp_path / "tally.db"))
    engine._syncer, healthy = failing, engine._syncer
    try:
        with capture_logs() as logs, pytest.raises(EngineError) as refused:
            await engine.submit([add(7, "2")])
        assert refused.value.code == "store_failed"
        # Written, maybe not kept: the client is told so, not "total unchanged".
        assert refused.value.message == SYNC_FAILED
        [failed] = [e for e in logs if e["event"] == "store.sync_failed"]
        assert failed["error"] == "fdatasync failed: 22 Invalid argument"
        assert engine.position.seq == 1  # the total rolled back
        # For good: what SQLite counts as committed may not be on disk, and no later
        # commit may be acked on top of it, even once the disk answers again.
        engine._syncer = healthy
        with pytest.raises(EngineError):
            await engine.submit([add(1, "3")])
        assert "restart the server" in (engine.degraded or "")
    finally:
        failing.close()
        os.close(read_end)
        os.close(write_end)
        await engine.close()


async def test_without_a_helper_the_store_thread_syncs_and_nothing_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wstally.engine.local

    monkeypatch.setattr(wstally.engine.local, "SYNCER_RETRY", within(0.5))
    engine = await engine_on(tmp_path)
    syncer = engine._syncer
    assert syncer is not None
    try:
        assert isinstance((await engine.submit([add(1, "1")]))[0], Update)
        pid = syncer.pid
        assert pid is not None
        # The helper dies and no new one can start (say, the interpreter was upgraded
        # away under a running server): the store's thread takes over.
        syncer._executable = "/nonexistent/python3"
        os.kill(pid, signal.SIGKILL)
        with capture_logs() as logs:
            for n in range(2, 6):
                [result] = await engine.submit([add(n, str(n))])
                assert isinstance(result, Update)
                assert result.seq == n
        assert engine._syncer is None
        [unavailable] = [e for e in logs if e["event"] == "store.syncer_unavailable"]
        assert "cannot start the fsync helper" in unavailable["error"]
        assert engine.degraded is None
        # Not for good: a helper is tried again a while later (the cause may have passed).
        await asyncio.sleep(within(0.6))
        logsetup.configure("json", "info", stream=io.StringIO())
        try:
            with capture_logs() as logs:
                [result] = await engine.submit([add(6, "6")])
        finally:
            logsetup.configure("json", os.environ.get("WSTALLY_TEST_LOG_LEVEL", "warning"))
        assert isinstance(result, Update)
        assert engine._syncer is not None
        [resumed] = [e for e in logs if e["event"] == "store.syncer_resumed"]
        assert resumed["pid"] == engine._syncer.pid
        assert isinstance(engine.store, SQLiteStore)
        assert engine.store.checkpoints_deferred
    finally:
        await engine.close()
    reopened = SQLiteStore(tmp_path / "tally.db")
    assert [u.seq for u in reopened.history()] == [1, 2, 3, 4, 5, 6]
    reopened.close()


async def test_the_helper_checkpoints_the_wal_into_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wstally.engine.local

    monkeypatch.setattr(wstally.engine.local, "CHECKPOINT_COMMITS", 20)
    engine = await engine_on(tmp_path)
    db = tmp_path / "tally.db"
    try:
        assert isinstance(engine.store, SQLiteStore)
        assert engine.store.checkpoints_deferred  # SQLite's own, inside COMMIT, are off
        before = db.stat().st_size
        for n in range(19):
            await engine.submit([add(1, f"{n}-{i}") for i in range(100)])
        # Nothing reached the database file yet.
        assert db.stat().st_size == before
        await engine.submit([add(1, "last")])
        assert db.stat().st_size > before
    finally:
        await engine.close()


async def test_a_checkpoint_cut_short_by_a_reader_is_asked_for_again_until_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    import wstally.engine.local

    monkeypatch.setattr(wstally.engine.local, "CHECKPOINT_COMMITS", 3)
    engine = await engine_on(tmp_path)
    try:
        await engine.submit([add(1, "a")])
        # A replay's read holds a snapshot: the checkpoint cannot copy past it.
        reader = sqlite3.connect(tmp_path / "tally.db", isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM updates").fetchone()
        for n in range(10):
            await engine.submit([add(1, f"b{n}")])
        commits, _ = engine._since_checkpoint
        assert commits == 11  # still asked for, every commit since the third
        reader.execute("COMMIT")
        reader.close()
        await engine.submit([add(1, "c")])
        assert engine._since_checkpoint == (0, 0)  # done at last: the WAL starts over
    finally:
        await engine.close()
