"""The fsync that makes a commit durable, in a helper process rather than a thread.

A store thread that waits on the disk must take the GIL back when the disk answers, and while
the event loop is busy (writing a broadcast to a thousand sockets, say) it waits for the
interpreter's switch interval, 5 ms, every time: on a loaded server, a 0.3 ms commit took
1-10 ms this way (docs/benchmarks.md). So the loop writes the transaction itself (no fsync:
page-cache writes, microseconds) and asks a small helper process to ``fdatasync`` the file;
the answer comes back on a pipe that the event loop watches like any socket. The helper holds
no GIL of ours and the loop never blocks on the disk.

The helper runs ``python -I -S -c _CHILD``: no imports beyond ``os``, ready in ~20 ms. It
ignores SIGINT (a Ctrl-C in the server's terminal reaches the whole process group; the server
drains and still needs its fsyncs) and ends when its request pipe closes, which the kernel
does for us when the server dies, even by SIGKILL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import subprocess
import sys

from wstally import logsetup

__all__ = ["SyncError", "Syncer"]

log = logsetup.get_logger("wstally.store")

# One request byte in; one reply line out per request: "0" when the file is on disk, or
# "<errno> <message>" when fdatasync failed. Requests that pile up while one fsync runs are
# answered by the next one: it covers everything written before it was asked for.
_CHILD = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
fd, directory = int(sys.argv[1]), int(sys.argv[2])
os.fsync(directory)
os.close(directory)
while True:
    asked = os.read(0, 4096)
    if not asked:
        break
    try:
        os.fdatasync(fd)
        reply = b"0\\n"
    except OSError as exc:
        reply = f"{exc.errno} {exc.strerror}\\n".encode()
    os.write(1, reply * len(asked))
"""


class SyncError(Exception):
    """fdatasync failed: what was written may not be on disk."""


class Syncer:
    """Makes one open file durable on request, from a helper process."""

    def __init__(self, fd: int, directory: str) -> None:
        self._fd = fd
        self._directory = directory
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The helper's pipes: requests in, replies out.
        self._ask = self._answers = -1
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._partial = b""
        self.restarts = 0
        self._exit_code: int | None = None  # of the helper that stopped last

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def sync(self) -> None:
        """Return once everything written to the file so far is on disk.

        A helper that died is started again and asked again (an fsync covers every write
        made before it, whoever asks); an fsync that fails raises SyncError.
        """
        for _ in range(2):
            if self._proc is None:
                self._spawn()
            future = asyncio.get_running_loop().create_future()
            self._waiting.append(future)
            try:
                # One byte into a pipe the helper keeps emptying: it does not block.
                os.write(self._ask, b"s")
                await future
                return
            except OSError:  # BrokenPipeError, or ConnectionError from _stopped
                self._stopped()
        raise SyncError("the fsync helper process stopped twice in a row")

    def close(self) -> None:
        """Stop the helper: its request pipe closes and it exits."""
        self._stopped()

    def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        directory = os.open(self._directory, os.O_RDONLY)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _CHILD, str(self._fd), str(directory)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(self._fd, directory),
            )
        finally:
            os.close(directory)
        if self._exit_code is not None:  # not the first helper: the one before stopped
            self.restarts += 1
            log.warning("store.syncer_restarted", pid=proc.pid, exit_code=self._exit_code)
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
            if future.done():
                continue
            if line == b"0":
                future.set_result(None)
            else:
                error = line.decode(errors="replace")
                future.set_exception(SyncError(f"fdatasync failed: {error}"))

    def _stopped(self) -> None:
        """The helper is gone (or is to go): whoever waits asks again, of a new one."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._answers)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            try:
                self._exit_code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                self._exit_code = proc.wait()
        self._ask = self._answers = -1
        self._partial = b""
        waiting, self._waiting = self._waiting, collections.deque()
        for future in waiting:
            if not future.done():
                future.set_exception(ConnectionError("the fsync helper process stopped"))
