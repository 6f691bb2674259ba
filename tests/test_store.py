"""The SQLite store on its own: it notices when its file is gone, and its lock sees through
symlinks."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from wstally.store import MemoryStore, SQLiteStore, StoreError
from wstally.store.sqlite import ROWS_PER_INSERT
from wstally.tally import Update


def updates(first: int, count: int, total: int = 0) -> list[Update]:
    batch = []
    for seq in range(first, first + count):
        total += seq
        batch.append(Update(seq, seq, total, 0.0, "conn", "c", None, f"id{seq}"))
    return batch


def rescued(tmp_path: Path, name: str = "tally.db") -> list[Path]:
    return sorted(tmp_path.glob(f"{name}.rescued-*"))


def test_check_passes_while_the_path_names_the_open_file(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "tally.db")
    try:
        store.commit(updates(1, 3))
        store.check()
        assert store.degraded is None
        # A rename of the directory entry back and forth keeps the same file: still fine.
        os.rename(tmp_path / "tally.db", tmp_path / "moved.db")
        os.rename(tmp_path / "moved.db", tmp_path / "tally.db")
        store.check()
        store.commit(updates(4, 1, 6))
        assert [u.seq for u in store.history()] == [1, 2, 3, 4]
    finally:
        store.close()


def test_a_batch_of_several_insert_statements_is_one_transaction(tmp_path: Path) -> None:
    # A commit longer than ROWS_PER_INSERT is written in several statements: every row
    # arrives, exactly as given, and a failure in a later statement keeps none of them.
    many = 2 * ROWS_PER_INSERT + 5
    store = SQLiteStore(tmp_path / "tally.db")
    try:
        first = updates(1, many)
        first[7] = first[7]._replace(client=None, name="Zoë", req_id=None, at=1.5)
        store.commit(first)
        assert store.history() == first
        second = updates(many + 1, many, first[-1].total)
        second[-1] = second[-1]._replace(seq=many)  # already taken: the last statement fails
        with pytest.raises(sqlite3.IntegrityError):
            store.commit(second)
        assert store.history() == first
        store.commit(updates(many + 1, 3, first[-1].total))
        assert [u.seq for u in store.history(since=many)] == [many + 1, many + 2, many + 3]
    finally:
        store.close()


def test_a_deleted_file_is_refused_for_good_and_rescued(tmp_path: Path) -> None:
    path = tmp_path / "tally.db"
    store = SQLiteStore(path)
    try:
        store.commit(updates(1, 5))
        path.unlink()
        with capture_logs() as logs, pytest.raises(StoreError, match="was deleted"):
            store.commit(updates(6, 1, 15))
        assert store.degraded is not None
        assert "restart the server" in store.degraded
        # For good: the next commit and check are refused too, and logged only once.
        with pytest.raises(StoreError):
            store.check()
        with pytest.raises(StoreError):
            store.commit(updates(6, 1, 15))
        [lost] = [e for e in logs if e["event"] == "store.file_lost"]
        [copy] = rescued(tmp_path)
        assert lost == {
            "event": "store.file_lost",
            "log_level": "error",
            "path": str(path),
            "reason": "was deleted",
            "rescued": str(copy),
            "rescue_error": None,
        }
        assert str(copy) in store.degraded
    finally:
        store.close()
    # The copy holds every committed update and nothing refused; the WAL left at the path
    # is empty, so a server started on that path cannot replay it into another file.
    assert not path.exists()
    assert (
        not (tmp_path / "tally.db-wal").exists() or (tmp_path / "tally.db-wal").stat().st_size == 0
    )
    copy_store = SQLiteStore(copy, readonly=True)
    try:
        assert [(u.seq, u.total) for u in copy_store.history()] == [
            (u.seq, u.total) for u in updates(1, 5)
        ]
    finally:
        copy_store.close()


def test_a_replaced_file_is_refused_and_left_intact(tmp_path: Path) -> None:
    path = tmp_path / "tally.db"
    other = SQLiteStore(tmp_path / "other.db")
    other.commit(updates(1, 2))
    other_epoch = other.load(10).epoch
    other.close()
    store = SQLiteStore(path)
    try:
        store.commit(updates(1, 4))
        os.replace(tmp_path / "other.db", path)
        with pytest.raises(StoreError, match="was replaced by another file"):
            store.check()
        with pytest.raises(StoreError):
            store.commit(updates(5, 1, 10))
    finally:
        store.close()
    # Our WAL (still at the path) was emptied: the file that replaced ours is read as it was.
    reopened = SQLiteStore(path)
    try:
        state = reopened.load(10)
        assert (state.epoch, state.seq) == (other_epoch, 2)
    finally:
        reopened.close()
    [copy] = rescued(tmp_path)
    copy_store = SQLiteStore(copy, readonly=True)
    try:
        assert [u.seq for u in copy_store.history()] == [1, 2, 3, 4]
    finally:
        copy_store.close()


def test_a_failed_rescue_is_reported_and_still_refuses(tmp_path: Path) -> None:
    path = tmp_path / "data" / "tally.db"
    path.parent.mkdir()
    store = SQLiteStore(path)
    try:
        store.commit(updates(1, 1))
        # The whole directory gone: there is nowhere to put a copy.
        for name in os.listdir(path.parent):
            os.unlink(path.parent / name)
        path.parent.rmdir()
        with capture_logs() as logs, pytest.raises(StoreError, match="was deleted"):
            store.check()
        [lost] = [e for e in logs if e["event"] == "store.file_lost"]
        assert lost["rescued"] is None
        assert "No such file or directory" in lost["rescue_error"]
    finally:
        store.close()


def test_a_symlink_meets_the_lock_of_the_real_file(tmp_path: Path) -> None:
    real = tmp_path / "real.db"
    link = tmp_path / "link.db"
    link.symlink_to(real)
    first = SQLiteStore(real)
    try:
        with pytest.raises(StoreError, match="in use by another wstally server"):
            SQLiteStore(link)
    finally:
        first.close()
    # And the other way round, also through a symlinked directory.
    (tmp_path / "dir").symlink_to(tmp_path)
    first = SQLiteStore(tmp_path / "dir" / "link.db")
    try:
        with pytest.raises(StoreError, match="in use"):
            SQLiteStore(real)
        # The lock sits beside the real file (while held: a clean close removes it).
        assert (tmp_path / "real.db.lock").exists()
        assert not (tmp_path / "link.db.lock").exists()
    finally:
        first.close()
    assert not (tmp_path / "real.db.lock").exists()


def test_a_symlink_loop_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a.db").symlink_to(tmp_path / "b.db")
    (tmp_path / "b.db").symlink_to(tmp_path / "a.db")
    with pytest.raises(StoreError, match="cannot open database"):
        SQLiteStore(tmp_path / "a.db")


def test_readers_and_the_memory_store_have_nothing_to_check(tmp_path: Path) -> None:
    path = tmp_path / "tally.db"
    SQLiteStore(path).close()
    reader = SQLiteStore(path, readonly=True)
    path.unlink()
    reader.check()
    reader.close()
    MemoryStore().check()


def test_a_deleted_wal_is_refused_for_good_and_rescued(tmp_path: Path) -> None:
    # Only the -wal file removed: SQLite goes on writing into the orphan, which no restart
    # would read, and the updates committed since the last checkpoint with it.
    path = tmp_path / "tally.db"
    store = SQLiteStore(path)
    try:
        store.commit(updates(1, 5))
        Path(f"{path}-wal").unlink()
        with capture_logs() as logs, pytest.raises(StoreError, match="write-ahead log"):
            store.commit(updates(6, 1, 15))
        [lost] = [e for e in logs if e["event"] == "store.file_lost"]
        assert lost["reason"] == "lost its write-ahead log (-wal file deleted)"
        [copy] = rescued(tmp_path)
        assert lost["rescued"] == str(copy)
    finally:
        store.close()
    copy_store = SQLiteStore(copy, readonly=True)
    assert [u.seq for u in copy_store.history()] == list(range(1, 6))
    copy_store.close()
