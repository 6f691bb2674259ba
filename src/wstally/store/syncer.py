"""The fsync that makes a commit durable, in a helper process rather than a thread.

A store thread that waits on the disk must take the GIL back when the disk answers, and while
the event loop is busy (writing a broadcast to a thousand sockets, say) it waits for the
interpreter's switch interval, 5 ms, every time: on a loaded server, a 0.3 ms commit took
1-10 ms this way (docs/benchmarks.md). So the loop writes the transaction itself (no fsync:
page-cache writes) and asks a small helper process to ``fdatasync`` the WAL, and now and then
to checkpoint it; the answer comes back on a pipe that the event loop watches like any
socket. The helper holds no GIL of ours, and the loop waits on the disk only once per
checkpoint (SQLite syncs the WAL's header when it starts the WAL over: ~0.4 ms here).

The helper runs ``python -I -S -c _CHILD``, ready in ~20 ms. It ignores SIGINT and SIGTERM (a
Ctrl-C in the server's terminal, or a service manager stopping it, reaches every process of
the group: the server then drains, and its last commits still need their fsyncs) and ends
when its request pipe closes, which the kernel does for us when the server dies, even by
SIGKILL.

Linux reports a failed writeback once per open file description. Each helper therefore gets
a description of its own, and the store's (the *witness*, never used by a helper) is
fsynced directly whenever a helper stops with a request unanswered: an error that the dead
helper saw but could not report is reported to the witness as well.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import subprocess
import sys
import threading

from wstally import logsetup

__all__ = ["SyncError", "SyncUnavailable", "Syncer", "failed", "fdatasync"]

log = logsetup.get_logger("wstally.store")

# macOS has no fdatasync; its fsync is what SQLite uses there too.
fdatasync = getattr(os, "fdatasync", os.fsync)


def failed(exc: OSError) -> str:
    """How a failed fsync is told, by the helper (its reply) and here alike."""
    return f"fdatasync failed: {exc.errno} {exc.strerror}"


# One request byte in ("s": sync; "c": sync, then checkpoint the WAL into the database); one
# reply line out per request byte: "0" when the file is on disk ("0 +" / "0 -" after a "c":
# the checkpoint done, or not all of it: a reader was in the way), or "<errno> <message>".
# The requests read in one go are answered by one fsync, made after all of them were asked.
# The helper's own connection to the database is opened at start, read-write but never
# creating a file, and checkpoints only while the path still names the server's file.
_CHILD = """
import os, signal, sys
for name in ("SIGINT", "SIGTERM", "SIGHUP"):
    signal.signal(getattr(signal, name), signal.SIG_IGN)
sync = getattr(os, "fdatasync", os.fsync)
fd, directory, database = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
identity = (int(sys.argv[4]), int(sys.argv[5]))
try:
    os.fsync(directory)
except OSError:
    pass  # a directory some filesystems will not fsync; SQLite goes on without, too
os.close(directory)
try:
    import sqlite3
    from urllib.parse import quote
    uri = "file:" + quote(database) + "?mode=rw"
    db = sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None)
    db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the WAL, opened now
except Exception:
    db = None

def checkpoint():
    try:
        st = os.stat(database)
        if db is None or (st.st_dev, st.st_ino) != identity or os.fstat(fd).st_nlink == 0:
            return b" -"
        busy, log, done = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return b" +" if busy == 0 and done == log else b" -"
    except Exception:
        return b" -"

try:
    while True:
        asked = os.read(0, 4096)
        if not asked:
            break
        try:
            sync(fd)
            ok = True
        except OSError as exc:
            ok, failed = False, f"{exc.errno} {exc.strerror}\\n".encode()
        done = checkpoint() if ok and b"c" in asked else b" -"
        os.write(1, b"".join(
            (b"0" + (done if a == 99 else b"") + b"\\n") if ok else failed for a in asked
        ))
except BrokenPipeError:
    pass
"""


class SyncError(Exception):
    """fdatasync failed: what was written may not be on disk."""


class SyncUnavailable(Exception):
    """No helper process can be asked (it cannot be started, or the syncer is closed)."""


class _Stopped(Exception):
    """The helper stopped before it answered."""


class Syncer:
    """Makes a SQLite database's WAL durable on request, from a helper process.

    ``witness`` is an open descriptor of the WAL (the store's), ``wal`` and ``database``
    their real paths, ``identity`` the database file's (st_dev, st_ino).
    """

    def __init__(
        self,
        witness: int,
        wal: str,
        database: str,
        identity: tuple[int, int] = (0, 0),
        executable: str = sys.executable,
    ) -> None:
        self._witness = witness
        self._wal = wal
        self._database = database
        self._identity = identity
        self._executable = executable
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The helper's pipes: requests in, replies out.
        self._ask = self._answers = -1
        self._waiting: collections.deque[asyncio.Future[bool]] = collections.deque()
        self._partial = b""
        self._closed = False
        self._spawned = 0  # helpers started
        # Helpers in a row that stopped before they answered anything: after two, there is
        # no helper to be had (a broken interpreter, say), not a helper that was killed.
        self._answered = False
        self._mute = 0
        self._exit_code: int | None = None  # of the helper that stopped last, if known

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def restarts(self) -> int:
        """Helpers started to replace one that stopped."""
        return max(0, self._spawned - 1)

    async def sync(self, checkpoint: bool = False) -> bool:
        """Return once everything written to the WAL so far is on disk; ``checkpoint``:
        then copy the WAL into the database file, so that SQLite starts it over, and
        return whether all of it was copied (a reader in the way stops it short).

        Raises SyncError when the fsync failed, SyncUnavailable when no helper can be
        started (the caller syncs some other way).
        """
        if self._closed:
            raise SyncUnavailable("the syncer is closed")
        if self._mute >= 2:
            raise SyncUnavailable("the fsync helper stops before it answers")
        loop = asyncio.get_running_loop()
        if self._proc is None or self._loop is not loop:
            self._stopped()
            try:
                self._spawn(loop)
            except OSError as exc:
                raise SyncUnavailable(f"cannot start the fsync helper: {exc}") from exc
        future: asyncio.Future[bool] = loop.create_future()
        self._waiting.append(future)
        try:
            # One byte into a pipe the helper keeps emptying: it does not block.
            os.write(self._ask, b"c" if checkpoint else b"s")
        except OSError:
            self._waiting.remove(future)
            self._stopped()
            await self._ask_witness()
            return False
        try:
            return await future
        except _Stopped:
            if self._closed:
                raise SyncUnavailable("the syncer was closed during an fsync") from None
            await self._ask_witness()
            return False

    async def _ask_witness(self) -> None:
        # The helper stopped (killed, say) with our request: had its fsync failed, only a
        # description that was open all along, and never used by a helper, still says so.
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, fdatasync, self._witness)
        except OSError as exc:
            raise SyncError(failed(exc)) from exc

    def close(self) -> None:
        """Stop the helper (its request pipe closes, it exits); no sync after this."""
        self._closed = True
        self._stopped()

    def _spawn(self, loop: asyncio.AbstractEventLoop) -> None:
        # A description of the WAL of the helper's own (see the module's docstring): the
        # same file as the witness, through /proc where there is one.
        reopen = f"/proc/self/fd/{self._witness}"
        fd = os.open(reopen if os.path.exists(reopen) else self._wal, os.O_RDWR)
        try:
            directory = os.open(os.path.dirname(self._wal) or ".", os.O_RDONLY)
        except OSError:
            os.close(fd)
            raise
        try:
            args = [str(fd), str(directory), self._database, *map(str, self._identity)]
            proc = subprocess.Popen(
                [self._executable, "-I", "-S", "-c", _CHILD, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(fd, directory),
            )
        finally:
            os.close(fd)
            os.close(directory)
        if self._spawned:  # the one before stopped
            log.warning("store.syncer_restarted", pid=proc.pid, exit_code=self._exit_code)
        self._spawned += 1
        self._answered = False
        self._proc, self._loop = proc, loop
        self._ask = proc.stdin.fileno() if proc.stdin is not None else -1
        self._answers = proc.stdout.fileno() if proc.stdout is not None else -1
        os.set_blocking(self._answers, False)
        loop.add_reader(self._answers, self._on_reply)

    def _on_reply(self) -> None:
        try:
            data = os.read(self._answers, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._stopped()
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            if not self._waiting:
                break
            future = self._waiting.popleft()
            if future.done():  # its commit was cancelled: the answer is nobody's
                continue
            if line[:1] == b"0":
                self._answered, self._mute = True, 0
                future.set_result(line == b"0 +")
            else:
                error = line.decode(errors="replace")
                future.set_exception(SyncError(f"fdatasync failed: {error}"))

    def _stopped(self) -> None:
        """The helper is gone, or is to go: whoever waits on it is told."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if not self._answered and not self._closed:
                self._mute += 1
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._answers)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            try:
                # Killed, or exiting now that its pipe is closed: a moment at most.
                self._exit_code = proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                # Stuck in an fsync (or stopped): reaped by a thread, never on the loop.
                self._exit_code = None
                threading.Thread(target=proc.wait, name="wstally-syncer-reap", daemon=True).start()
        self._ask = self._answers = -1
        self._partial = b""
        waiting, self._waiting = self._waiting, collections.deque()
        for future in waiting:
            if not future.done():
                future.set_exception(_Stopped())
