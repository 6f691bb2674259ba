"""The fsync helper process (store/syncer.py): real processes, real files, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from helpers import OpenClient, within
from servers import ServeProcess
from wstally.store.syncer import Syncer, SyncError
from wstally.tally import Update


def state(pid: int) -> str | None:
    """The process's state letter (Z: a zombie), or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rpartition(")")[2].split()[0]


@pytest.fixture
def data(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "data", os.O_WRONLY | os.O_CREAT)
    yield fd
    os.close(fd)


async def test_syncs_answer_in_order_and_close_ends_the_helper(data: int, tmp_path: Path) -> None:
    syncer = Syncer(data, str(tmp_path))
    os.write(data, b"x" * 4096)
    await asyncio.wait_for(syncer.sync(), within(5))
    pid = syncer.pid
    assert pid is not None
    assert state(pid) in ("S", "R", "D")
    # Many at once, as commits never are but a burst of them might be: each is answered.
    done: list[int] = []

    async def one(i: int) -> None:
        os.write(data, b"y")
        await syncer.sync()
        done.append(i)

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(50))), within(5))
    assert sorted(done) == list(range(50))
    assert syncer.pid == pid  # the same helper all along
    syncer.close()
    assert syncer.pid is None
    assert state(pid) is None  # exited and reaped


async def test_a_failing_fdatasync_raises_and_says_why(tmp_path: Path) -> None:
    # fdatasync on a pipe fails with EINVAL: the helper reports it, it does not die.
    read_end, write_end = os.pipe()
    syncer = Syncer(read_end, str(tmp_path))
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


async def test_a_helper_killed_with_sigkill_is_replaced_and_logged(
    data: int, tmp_path: Path
) -> None:
    syncer = Syncer(data, str(tmp_path))
    try:
        await asyncio.wait_for(syncer.sync(), within(5))
        first = syncer.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        with capture_logs() as logs:
            # Killed between two syncs, or while one is being answered: either way the
            # next sync is answered, by a new helper.
            await asyncio.wait_for(syncer.sync(), within(5))
            await asyncio.wait_for(syncer.sync(), within(5))
        assert syncer.pid not in (None, first)
        assert syncer.restarts == 1
        assert state(first) is None  # reaped, not left a zombie
        [restarted] = [e for e in logs if e["event"] == "store.syncer_restarted"]
        assert restarted == {
            "event": "store.syncer_restarted",
            "log_level": "warning",
            "pid": syncer.pid,
            "exit_code": -signal.SIGKILL,
        }
    finally:
        syncer.close()


async def test_sigint_to_the_process_group_leaves_the_helper_running(
    data: int, tmp_path: Path
) -> None:
    # A Ctrl-C in the server's terminal reaches every process of its group: the server
    # drains on it, and its last commits still need their fsyncs.
    syncer = Syncer(data, str(tmp_path))
    try:
        await asyncio.wait_for(syncer.sync(), within(5))
        pid = syncer.pid
        assert pid is not None
        os.kill(pid, signal.SIGINT)
        await asyncio.sleep(within(0.2))
        await asyncio.wait_for(syncer.sync(), within(5))
        assert syncer.pid == pid
        assert syncer.restarts == 0
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


async def test_a_failed_fsync_refuses_the_batch_and_every_commit_after_it(
    tmp_path: Path,
) -> None:
    from wstally.engine.base import EngineError, Submission
    from wstally.engine.local import LocalEngine
    from wstally.store import SQLiteStore

    engine = LocalEngine(SQLiteStore(tmp_path / "tally.db"))
    await engine.open()
    assert engine.store.description.startswith("sqlite:")
    [result] = await engine.submit([Submission(5, "c", 0.0, "a", None, "1")])
    assert isinstance(result, Update)
    assert result.seq == 1
    # A disk that fails its fsync: the helper's fdatasync pointed at a pipe (EINVAL), a
    # real failure from a real helper.
    read_end, write_end = os.pipe()
    failing = Syncer(read_end, str(tmp_path))
    engine._syncer, healthy = failing, engine._syncer
    try:
        with capture_logs() as logs, pytest.raises(EngineError) as refused:
            await engine.submit([Submission(7, "c", 0.0, "a", None, "2")])
        assert refused.value.code == "store_failed"
        [failed] = [e for e in logs if e["event"] == "store.sync_failed"]
        assert failed["error"] == "fdatasync failed: 22 Invalid argument"
        assert engine.position.seq == 1  # the total rolled back
        assert "fsync of" in (engine.degraded or "")
        # For good: what SQLite counts as committed may not be on disk, and no later
        # commit may be acked on top of it, even once the disk answers again.
        engine._syncer = healthy
        with pytest.raises(EngineError):
            await engine.submit([Submission(1, "c", 0.0, "a", None, "3")])
        assert "restart the server" in (engine.degraded or "")
    finally:
        failing.close()
        os.close(read_end)
        os.close(write_end)
        await engine.close()
