"""The fsync that makes a commit durable, in a helper process rather than a thread.

A store thread that waits on the disk must take the GIL back when the disk answers, and while
the event loop is busy (writing a broadcast to a thousand sockets, say) it waits for the
interpreter's switch interval, 5 ms, every time: on a loaded server, a 0.3 ms commit took
1-10 ms this way (docs/benchmarks.md). So the loop writes the transaction itself (no fsync:
page-cache writes) and asks a small helper process to ``fdatasync`` the WAL, and now and then
to checkpoint it; the answer comes back on a pipe that the event loop watches like any
socket. The helper holds no GIL of ours and the loop never waits on the disk.

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

__all__ = ["SyncError", "SyncUnavailable", "Syncer", "fdatasync"]

log = logsetup.get_logger("wstally.store")

# macOS has no fdatasync; its fsync is what SQLite uses there too.
fdatasync = getattr(os, "fdatasync", os.fsync)

# One request byte in ("s": sync; "c": sync, then checkpoint the WAL into the database); one
# reply line out per request byte: "0" when the file is on disk, or "<errno> <message>". The
# requests read in one go are answered by one fsync, made after all of them were asked. A
# checkpoint that fails (a reader in the way) is left for the next one: it loses nothing.
_CHILD = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sync = getattr(os, "fdatasync", os.fsync)
fd, directory, database = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.fsync(directory)
os.close(directory)
db = None
try:
    while True:
        asked = os.read(0, 4096)
        if not asked:
            break
        try:
            sync(fd)
            reply = b"0\\n"
        except OSError as exc:
            reply = f"{exc.errno} {exc.strerror}\\n".encode()
        if b"c" in asked and reply == b"0\\n":
            try:
                if db is None:
                    import sqlite3
                    db = sqlite3.connect(database, isolation_level=None)
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except Exception:
                pass
        os.write(1, reply * len(asked))
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
    their real paths.
    """

    def __init__(
        self, witness: int, wal: str, database: str, executable: str = sys.executable
    ) -> None:
        self._witness = witness
        self._wal = wal
        self._database = database
        self._executable = executable
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The helper's pipes: requests in, replies out.
        self._ask = self._answers = -1
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._partial = b""
        self._closed = False
        self._spawned = 0
        self.restarts = 0
        self._exit_code: int | None = None  # of the helper that stopped last, if known

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def sync(self, checkpoint: bool = False) -> None:
        """Return once everything written to the WAL so far is on disk; ``checkpoint``:
        then copy the WAL into the database file, so that SQLite starts it over.

        Raises SyncError when the fsync failed, SyncUnavailable when no helper can be
        started (the caller syncs some other way).
        """
        if self._closed:
            raise SyncUnavailable("the syncer is closed")
        loop = asyncio.get_running_loop()
        if self._proc is None or self._loop is not loop:
            self._stopped()
            try:
                self._spawn(loop)
            except OSError as exc:
                raise SyncUnavailable(f"cannot start the fsync helper: {exc}") from exc
        future = loop.create_future()
        self._waiting.append(future)
        try:
            # One byte into a pipe the helper keeps emptying: it does not block.
            os.write(self._ask, b"c" if checkpoint else b"s")
        except OSError:
            self._waiting.remove(future)
            self._stopped()
            await self._ask_witness()
            return
        try:
            await future
        except _Stopped:
            if self._closed:
                raise SyncUnavailable("the syncer was closed during an fsync") from None
            await self._ask_witness()

    async def _ask_witness(self) -> None:
        # The helper stopped (killed, say) with our request: had its fsync failed, only a
        # description that was open all along, and never used by a helper, still says so.
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, fdatasync, self._witness)
        except OSError as exc:
            raise SyncError(f"fdatasync failed: {exc.errno} {exc.strerror}") from exc

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
            args = [str(fd), str(directory), self._database]
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
            self.restarts += 1
            log.warning("store.syncer_restarted", pid=proc.pid, exit_code=self._exit_code)
        self._spawned += 1
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
            if line == b"0":
                future.set_result(None)
            else:
                error = line.decode(errors="replace")
                future.set_exception(SyncError(f"fdatasync failed: {error}"))

    def _stopped(self) -> None:
        """The helper is gone, or is to go: whoever waits on it is told."""
        proc, self._proc = self._proc, None
        if proc is not None:
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
