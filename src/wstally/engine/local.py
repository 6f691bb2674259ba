"""The local engine: the tally core in memory, journalled to SQLite (or kept in memory).

One process is the authority. A batch is applied to the core at once (seqs assigned in
arrival order, duplicates recognised, int64 bounds checked), then written to the store in one
transaction, from the loop, and made durable by an fsync in a helper process
(``store/syncer.py``; on the store's thread when there is no helper); only then is it
published on the feed and answered. A failed write rolls the core back, so memory never runs
ahead of what the disk holds; a failed fsync stops every commit until a restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from wstally import logsetup
from wstally.engine.base import EngineError, FeedEvent, Position, Published, Result, Submission
from wstally.store import SQLiteStore, Store, StoreError, SyncFailed
from wstally.store.syncer import Syncer, SyncError, SyncUnavailable
from wstally.tally import Tally, Update

__all__ = [
    "CHECKPOINT_COMMITS",
    "CHECKPOINT_UPDATES",
    "CHECK_INTERVAL",
    "STORE_FAILED",
    "SYNCER_RETRY",
    "SYNC_FAILED",
    "LocalEngine",
]

log = logsetup.get_logger("wstally.engine")

T = TypeVar("T")

STORE_FAILED = "the update could not be stored; total unchanged"
# After a failed fsync the update was written but maybe not kept: only a restart can tell.
SYNC_FAILED = (
    "the disk failed while storing the update: it may or may not have been kept; "
    "resend it with the same id once the server is restarted"
)
# The WAL is checkpointed into the database (by the syncer's helper, during a commit's
# fsync) after this many commits or updates, whichever comes first: roughly SQLite's own
# 1,000 pages (a commit writes a page or two, an update some 60 bytes).
CHECKPOINT_COMMITS = 500
CHECKPOINT_UPDATES = 50_000
# Without a helper (none could be started: out of file descriptors, say), commits are synced
# on the store's thread, and a helper is tried again this many seconds later.
SYNCER_RETRY = 30.0
# How often an idle store is checked (its file deleted or replaced, say): /healthz and the
# log should tell before the next add finds out.
CHECK_INTERVAL = 0.5


class LocalEngine:
    def __init__(self, store: Store | Callable[[], Store], name: str | None = None) -> None:
        # A factory opens the store only in open(): a server that cannot listen on its
        # port must not create (or lock) a database file first.
        if callable(store):
            self._open_store: Callable[[], Store] | None = store
            self.name = name or "sqlite"
            self.description = self.name
        else:
            self._open_store = None
            self._store = store
            self.name = name or ("sqlite" if store.blocking else "memory")
            self.description = store.description
        self.tally = Tally(epoch="")
        self._executor: ThreadPoolExecutor | None = None
        # Replays read through their own connection on their own thread (SQLite's WAL lets
        # readers run beside the writer): a commit never waits behind a replay's read.
        self._reader: Store | None = None
        self._read_executor: ThreadPoolExecutor | None = None
        # SQLite's commits: the transaction written on the loop, its fsync in a helper
        # process (store/syncer.py), or None: the whole commit on the store's thread.
        self._syncer: Syncer | None = None
        self._since_checkpoint = (0, 0)  # commits, updates
        self._syncer_retry: float | None = None  # loop time to try a helper again
        self._closing = False
        self._feed: asyncio.Queue[FeedEvent] = asyncio.Queue()
        self._watcher: asyncio.Task[None] | None = None
        # Why commits fail (for /healthz), or None: set by a failed commit or check,
        # cleared by the next good commit.
        self.degraded: str | None = None
        self.check_interval = CHECK_INTERVAL

    @property
    def store(self) -> Store:
        return self._store

    async def open(self) -> Position:
        if self._open_store is not None:
            self._store = self._open_store()
            self.description = self._store.description
        if self._store.blocking:
            # Reads (history) take turns with the commits on the store's one thread.
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wstally-store")
        state = await self._run(self.store.load, self.tally.window)
        self._open_reader()
        await self._open_syncer()
        tally = self.tally = Tally(state.epoch, state.seq, state.total)
        for update in state.recent_ids:
            assert update.req_id is not None
            tally.remember(update.scope, update.req_id, update.seq, update.total)
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="store-check")
        return Position(tally.epoch, tally.seq, tally.total)

    async def submit(self, batch: Sequence[Submission]) -> list[Result]:
        tally = self.tally
        try:
            results: list[Result] = tally.apply_all(batch)
        except BaseException:
            tally.rollback()  # the adds applied before the one that raised: none is stored
            raise
        updates = [r for r in results if type(r) is Update]
        if not updates:
            return results
        try:
            await self._commit(updates)
        except Exception as exc:
            tally.rollback()
            self.degraded = _reason(exc)
            log.critical(
                "store.commit_failed",
                error=str(exc),
                error_type=type(exc).__name__,
                refused=len(updates),
                first_seq=updates[0].seq,
                last_seq=updates[-1].seq,
                total=tally.total,
            )
            message = SYNC_FAILED if isinstance(exc, SyncFailed) else STORE_FAILED
            raise EngineError("store_failed", message, transient=False) from exc
        self.degraded = None
        last = updates[-1]
        tally.commit(last.seq, last.total)
        self._feed.put_nowait(Published(updates))
        return results

    async def _commit(self, updates: list[Update]) -> None:
        store = self._store
        retry = self._syncer_retry
        if retry is not None and asyncio.get_running_loop().time() >= retry:
            await self._open_syncer(again=True)
        syncer = self._syncer
        if syncer is None:
            await self._run(store.commit, updates)
            return
        assert isinstance(store, SQLiteStore)
        # Page-cache writes only: cheaper here than a trip to a thread and back, which
        # waits for the GIL while the loop is busy.
        store.write(updates)
        # Written: from here on, an fsync that cannot be vouched for degrades the store for
        # good (never "total unchanged" for an update that is in the file).
        commits, count = self._since_checkpoint
        commits, count = commits + 1, count + len(updates)
        checkpoint = commits >= CHECKPOINT_COMMITS or count >= CHECKPOINT_UPDATES
        try:
            done = await syncer.sync(checkpoint)
        except SyncError as exc:
            store.sync_failed(str(exc))
        except SyncUnavailable as exc:
            await self._sync_without_helper(store, str(exc))
            return
        except Exception as exc:
            store.sync_failed(f"{type(exc).__name__}: {exc}")
        # A checkpoint cut short (a replay reading) is asked for again with the next
        # commit, as SQLite itself does: otherwise the WAL would grow for as long as
        # replays go on.
        self._since_checkpoint = (0, 0) if done else (commits, count)

    async def _sync_without_helper(self, store: SQLiteStore, error: str) -> None:
        if self._closing:
            store.sync_failed("the server stopped before the fsync")
        self._without_helper(self._syncer, error)
        # The store's thread syncs until a helper is back, and SQLite checkpoints inside
        # its commits again.
        try:
            store.defer_checkpoints(False)
            await self._run(store.sync)
        except SyncFailed:
            raise
        except Exception as exc:
            store.sync_failed(f"{type(exc).__name__}: {exc}")

    async def _open_syncer(self, again: bool = False) -> None:
        store = self._store
        self._syncer_retry = None
        # Only beside a reader of its own: replays must not read through the connection
        # the loop writes on, which would make them wait for the loop's writes. (A replay
        # reads up to the hub's position only, what was acked or published: a transaction
        # is visible to readers from its write on, a moment before its fsync.)
        if not isinstance(store, SQLiteStore) or self._reader is None or store.wal_fd < 0:
            return
        syncer = Syncer(store.wal_fd, store.wal_path, str(store.real_path), store.identity)
        try:
            await syncer.sync()
            if syncer.pid is None:
                raise SyncUnavailable("the fsync helper stopped before it answered")
        except (SyncError, SyncUnavailable) as exc:
            self._without_helper(syncer, str(exc))
            return
        store.defer_checkpoints(True)
        self._syncer = syncer
        if again:
            log.info("store.syncer_resumed", pid=syncer.pid)

    def _without_helper(self, syncer: Syncer | None, error: str) -> None:
        """No helper to be had: say so, and try again in a while."""
        if syncer is not None:
            syncer.close()
        self._syncer = None
        log.warning("store.syncer_unavailable", error=error)
        self._syncer_retry = asyncio.get_running_loop().time() + SYNCER_RETRY

    async def feed(self) -> AsyncIterator[FeedEvent]:
        while True:
            yield await self._feed.get()

    async def history(self, since: int, limit: int) -> list[Update]:
        if self._reader is None or self._read_executor is None:
            return await self._run(self.store.history, since, limit)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read_executor, self._reader.history, since, limit)

    def _open_reader(self) -> None:
        store = self._store
        if not isinstance(store, SQLiteStore):
            return
        try:
            self._reader = SQLiteStore(store.path, readonly=True)
        except StoreError:
            return  # replays then take turns with the commits, as they used to
        self._read_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wstally-read")

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"engine": self.name, "store": self.description}
        if self.degraded is not None:
            status["degraded"] = self.degraded
        return status

    @property
    def position(self) -> Position:
        """The last committed update (acknowledged, or about to be)."""
        tally = self.tally
        return Position(tally.epoch, tally.committed_seq, tally.committed_total)

    async def close(self) -> None:
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
        if self._syncer is not None:
            self._syncer.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._read_executor is not None:
            self._read_executor.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()
        if hasattr(self, "_store"):
            self.store.close()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                if self._syncer is not None:
                    self.store.check()  # one stat(): and the loop owns the connection now
                else:
                    await self._run(self.store.check)
            except Exception as exc:
                self.degraded = _reason(exc)


def _reason(exc: Exception) -> str:
    # A StoreError speaks to the operator already; anything else is a failed write.
    return str(exc) if isinstance(exc, StoreError) else f"commit failed: {exc}"
