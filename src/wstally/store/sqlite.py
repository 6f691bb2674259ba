"""SQLite in WAL mode: one row per applied update (the audit trail), grouped commits.

Every update applied since the previous commit goes in one transaction, so one fsync covers
many updates. A commit is ``write`` (the transaction, without an fsync) and then ``sync``
(an fdatasync of the WAL): ``commit`` does both, on the store's thread; the local engine
writes from the event loop and has a helper process sync (``syncer.py``). Either way nothing
is acknowledged before its fsync. Readers (``wstally history``) can open the same file while
the server runs: WAL lets them read without blocking the writer; they see a transaction
from its write on, a moment before its fsync.

SQLite keeps writing into its open file after that file is deleted or replaced, where no
restart will ever find it: ``check`` (before every commit, and periodically when idle)
notices when the path no longer names the open file, and the store then refuses to commit.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import IO, NoReturn

from wstally import logsetup
from wstally.store.base import ROW_COLUMNS, StoredState, StoreError, SyncFailed, new_epoch
from wstally.store.syncer import failed, fdatasync
from wstally.tally import Update

__all__ = ["SQLiteStore"]

log = logsetup.get_logger("wstally.store")

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS updates (
    seq    INTEGER PRIMARY KEY,
    at     REAL    NOT NULL,
    conn   TEXT    NOT NULL,
    client TEXT,
    name   TEXT,
    req_id TEXT,
    delta  INTEGER NOT NULL,
    total  INTEGER NOT NULL
);
"""

# In Update's field order, so that ``Update(*row)`` rebuilds an update from a selected row.
_COLUMNS = ", ".join(Update._fields)

# Rows per INSERT statement in a commit. One statement of many rows binds them in one call
# and steps once; executemany() resets, binds and steps row by row, which cost 4.2-4.3 µs a
# row here against 3.0-3.5 (docs/benchmarks.md), a fifth of the server's CPU per durable add
# being the write. 64 rows are 512 parameters, below SQLite's limit (999 before 3.32).
ROWS_PER_INSERT = 64


def _null(value: None) -> None:
    return None


# sqlite3 (CPython 3.11) looks up an adapter for every parameter that is not an int, float,
# str or bytearray, None included, and its lookup fails by raising, formatting and dropping
# an AttributeError: 0.3 µs per None here, and a row has one or two (client, name). With an
# adapter registered for None, the lookup finds it at once, 0.6 µs a row less with two.
# Process-wide, and harmless: None is bound as NULL either way.
sqlite3.register_adapter(type(None), _null)


@functools.lru_cache(maxsize=ROWS_PER_INSERT)
def _insert(rows: int) -> str:
    values = ", ".join(["(" + ", ".join("?" * len(Update._fields)) + ")"] * rows)
    return f"INSERT INTO updates ({_COLUMNS}) VALUES {values}"


class SQLiteStore:
    blocking = True

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.description = f"sqlite:{self.path}"
        self._real = self.path
        self._lock: IO[bytes] | None = None
        # The write-ahead log, whose fdatasync makes a commit durable (-1: read-only).
        self.wal_fd = -1
        self.wal_path = ""
        # (st_dev, st_ino) of the file opened: the path must keep naming it.
        self._identity: tuple[int, int] | None = None
        # Why this store can no longer commit (its file is gone), or None.
        self.degraded: str | None = None
        try:
            if readonly:
                # A URI, quoted, so that any file name works; read-only, and without the
                # lock file, so that it works beside a running server (WAL readers never
                # block the writer).
                uri = self.path.absolute().as_uri() + "?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            else:
                # Through any symlinks: the lock and a rescued copy go beside the real file.
                self._real = self.path.resolve()
                self._take_lock()
                self._db = sqlite3.connect(self.path, check_same_thread=False)
                # A short wait for a lock (only someone else's sqlite3 shell can hold one:
                # the lock file keeps other servers out), since the loop may be waiting.
                self._db.execute("PRAGMA busy_timeout=100")
                (mode,) = self._db.execute("PRAGMA journal_mode=WAL").fetchone()
                if mode != "wal":
                    raise sqlite3.OperationalError(f"cannot use WAL mode (journal mode {mode})")
                # NORMAL: SQLite itself syncs the WAL's header when it starts it over and
                # everything at checkpoints, never at a commit; every commit is made durable
                # by an fdatasync of the WAL that we make before acking (``sync``, or a
                # Syncer's helper): what synchronous=FULL does, done where it does not hold
                # up the event loop. An acked update survives power loss.
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
                # The WAL, beside the real file (SQLite follows symlinks): kept, same inode,
                # for as long as SQLite has the database open (reset after a checkpoint,
                # never removed).
                self.wal_path = f"{self._real}-wal"
                self.wal_fd = os.open(self.wal_path, os.O_RDWR | os.O_CLOEXEC)
                # The file exists now and is open; an inode is never reused while open.
                st = os.stat(self.path)
                self._identity = (st.st_dev, st.st_ino)
        except (sqlite3.Error, OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            self._release_lock()
            raise StoreError(f"cannot open database {self.path}: {exc}") from exc

    @property
    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the database file opened ((0, 0): read-only)."""
        return self._identity or (0, 0)

    @property
    def checkpoints_deferred(self) -> bool:
        (pages,) = self._db.execute("PRAGMA wal_autocheckpoint").fetchone()
        return int(pages) == 0

    @property
    def real_path(self) -> Path:
        """The database file itself, through any symlinks."""
        return self._real

    @property
    def lock_path(self) -> Path:
        return self._real.with_name(self._real.name + ".lock")

    def _take_lock(self) -> None:
        # Two servers appending to one file would both claim the same seq numbers. Beside
        # the real file, so that a symlink to it meets the same lock.
        lock_path = self.lock_path
        while True:
            self._lock = open(lock_path, "ab")  # noqa: SIM115 - held for the store's lifetime
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._release_lock()
                raise StoreError(
                    f"database {self.path} is in use by another wstally server"
                ) from None
            # The lock file is removed when its holder stops: a lock taken on a file that
            # was removed meanwhile locks nothing. Held, and still the file at the path?
            held = os.fstat(self._lock.fileno())
            try:
                current = os.stat(lock_path)
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (
                held.st_dev,
                held.st_ino,
            ):
                return
            self._release_lock()

    def _release_lock(self, remove: bool = False) -> None:
        if self._lock is not None:
            if remove:
                # Removed while still held (see _take_lock): no one can lock the old file
                # and believe it is the live one.
                with contextlib.suppress(OSError):
                    os.unlink(self.lock_path)
            with contextlib.suppress(OSError):
                self._lock.close()
            self._lock = None

    def load(self, window: int) -> StoredState:
        try:
            epoch = self._epoch()
            row = self._db.execute("SELECT seq, total FROM updates ORDER BY seq DESC LIMIT 1")
            last = row.fetchone()
            state = StoredState(epoch)
            if last is not None:
                state.seq, state.total = last
                cursor = self._db.execute(
                    f"SELECT {_COLUMNS} FROM updates WHERE seq > ? AND req_id IS NOT NULL "
                    "ORDER BY seq",
                    (state.seq - window,),
                )
                state.recent_ids = [Update(*r) for r in cursor]
            return state
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read database {self.path}: {exc}") from exc

    def _epoch(self) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        if row is not None:
            return str(row[0])
        epoch = new_epoch()
        with self._db:
            self._db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("epoch", epoch), ("schema", SCHEMA_VERSION)],
            )
        return epoch

    def check(self) -> None:
        """Raise StoreError if commits would no longer reach the file a restart opens.

        That is, once the path no longer names the open file (deleted, or replaced by
        another): for good, since whatever was acked is in the orphaned file only. One
        stat(), about 2 us: next to a commit and its fsync (0.3 ms at best) it is noise.
        """
        if self.degraded is None and self._identity is not None:
            what = self._moved()
            if what is not None:
                self._lost(what)
        if self.degraded is not None:
            raise StoreError(self.degraded)

    def _moved(self) -> str | None:
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return "was deleted"
        except OSError:
            return None  # cannot tell (EACCES, EIO): the commit itself will say
        if (st.st_dev, st.st_ino) != self._identity:
            return "was replaced by another file"
        with contextlib.suppress(OSError):
            if self.wal_fd >= 0 and os.fstat(self.wal_fd).st_nlink == 0:
                return "lost its write-ahead log (-wal file deleted)"
        return None

    def _lost(self, what: str) -> None:
        rescued, error = self._rescue()
        # Our WAL stays at the path after we close (SQLite does not checkpoint a moved
        # file) and would be replayed into whatever file a restart finds there: fold it
        # into the file we hold and empty it.
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.degraded = f"database file {self.path} {what} while in use; restart the server" + (
            f" (everything committed is in {rescued})" if rescued is not None else ""
        )
        log.error(
            "store.file_lost",
            path=str(self.path),
            reason=what,
            rescued=rescued,
            rescue_error=error,
        )

    def _rescue(self) -> tuple[str | None, str | None]:
        """Copy everything committed (the open file, through SQLite) beside the real file:
        the last chance to save it. Returns the copy's path, or why there is none."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self._real.with_name(f"{self._real.name}.rescued-{stamp}")
        try:
            # Claim the name first: never write into a file that is already there.
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except OSError as exc:
            return None, str(exc)
        try:
            copy = sqlite3.connect(target)
            try:
                self._db.backup(copy)
            finally:
                copy.close()
        except sqlite3.Error as exc:
            with contextlib.suppress(OSError):
                target.unlink()
            return None, str(exc)
        return str(target), None

    def commit(self, batch: Sequence[Update]) -> None:
        """Write ``batch`` in one transaction and make it durable."""
        self.write(batch)
        self.sync()

    def write(self, batch: Sequence[Update]) -> None:
        """Write ``batch`` in one transaction, all or nothing: it survives a crash of this
        process, not yet a power cut (until ``sync``, or a Syncer's, returns)."""
        # Every commit: a deleted file must not take one more acked update with it.
        self.check()
        execute = self._db.execute
        with self._db:
            # An Update is a tuple in _COLUMNS' order: its fields are the row's values.
            for start in range(0, len(batch), ROWS_PER_INSERT):
                part = batch[start : start + ROWS_PER_INSERT]
                execute(_insert(len(part)), list(chain.from_iterable(part)))

    def sync(self) -> None:
        """fdatasync the WAL: every transaction written so far survives a power cut."""
        try:
            fdatasync(self.wal_fd)
        except OSError as exc:
            self.sync_failed(failed(exc))

    def sync_failed(self, error: str) -> NoReturn:
        """What was written may not be on disk, and SQLite counts it as committed: no
        further commit may be acknowledged on top of it (a restart tells what survived)."""
        self.degraded = f"fsync of {self.path} failed ({error}); restart the server"
        log.error("store.sync_failed", path=str(self.path), error=error)
        raise SyncFailed(self.degraded)

    def defer_checkpoints(self, deferred: bool) -> None:
        """Whether checkpoints are left to the caller (a Syncer's helper), rather than made
        by SQLite inside a commit every 1,000 pages (its default): on the event loop, that
        would be two fsyncs and megabytes of writes, 10-13 ms, in the middle of a commit."""
        self._db.execute(f"PRAGMA wal_autocheckpoint={0 if deferred else 1000}")

    def history(self, since: int = 0, limit: int | None = None) -> list[Update]:
        cursor = self._db.execute(
            f"SELECT {_COLUMNS} FROM updates WHERE seq > ? ORDER BY seq LIMIT ?",
            (since, -1 if limit is None else limit),
        )
        return [Update(*r) for r in cursor]

    # Read-only access for ``wstally history``: rows as stored, unconverted, so that a
    # verification sees exactly what is on disk.

    def meta(self) -> dict[str, str]:
        try:
            return {str(k): str(v) for k, v in self._db.execute("SELECT key, value FROM meta")}
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read database {self.path}: {exc}") from exc

    def rows(
        self, since: int = 0, client: str | None = None, tail: int | None = None
    ) -> Iterator[tuple[object, ...]]:
        """Update rows after ``since``, in seq order, as stored (``store.ROW_COLUMNS``).

        ``client`` keeps the rows of that client id or display name; ``tail`` only the last
        that many.
        """
        where = "seq > ?"
        params: list[object] = [since]
        if client is not None:
            where += " AND (client = ? OR name = ?)"
            params += [client, client]
        columns = ", ".join(ROW_COLUMNS)
        try:
            if tail is not None:
                query = f"SELECT {columns} FROM updates WHERE {where} ORDER BY seq DESC LIMIT ?"
                yield from reversed(self._db.execute(query, [*params, tail]).fetchall())
                return
            cursor = self._db.execute(
                f"SELECT {columns} FROM updates WHERE {where} ORDER BY seq", params
            )
            yield from cursor
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read database {self.path}: {exc}") from exc

    def row(self, seq: int) -> tuple[object, ...] | None:
        columns = ", ".join(ROW_COLUMNS)
        try:
            found = self._db.execute(f"SELECT {columns} FROM updates WHERE seq = ?", (seq,))
            row: tuple[object, ...] | None = found.fetchone()
            return row
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read database {self.path}: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        if self.wal_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.wal_fd)
            self.wal_fd = -1
        # A clean stop leaves no lock file behind (it exists while a server runs).
        self._release_lock(remove=True)
