"""``wstally.logs.follow``: --follow through partial lines, rotation and truncation."""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from helpers import within
from logcases import BOB, LINES, closed
from wstally.logs.follow import Tail


class Follower:
    """``wstally logs --follow`` as a process, its output lines collected on a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wstally", "logs", "--follow", "--poll-interval", "0.02", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw)

    def next(self) -> bytes:
        return self.lines.get(timeout=within(10))

    def nothing_for(self, seconds: float) -> bool:
        try:
            self.lines.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=within(10))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(within(5))
            assert self.proc.stdout is not None
            assert self.proc.stderr is not None
            err = self.proc.stderr.read().decode()
            self.proc.stdout.close()
            self.proc.stderr.close()
        return code, err


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as file:
        file.write(data)


def test_follow_survives_partial_lines_rotation_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    path.write_bytes((LINES[0] + LINES[1]).encode())
    follower = Follower("--json", "--since", "2000-01-01", str(path))
    try:
        # --since: from the beginning.
        assert [follower.next(), follower.next()] == [LINES[0].encode(), LINES[1].encode()]
        append(path, LINES[2].encode())
        assert follower.next() == LINES[2].encode()
        # Half a line is held back until its end is written.
        half = len(LINES[3]) // 2
        append(path, LINES[3][:half].encode())
        assert follower.nothing_for(0.2)
        append(path, LINES[3][half:].encode() + b"garbage\n")
        assert follower.next() == LINES[3].encode()
        # Rotation: the old file is read to its end (a late line), then the new one.
        path.rename(tmp_path / "server.log.1")
        append(tmp_path / "server.log.1", LINES[4].encode())
        path.write_bytes(LINES[5].encode())
        assert [follower.next(), follower.next()] == [LINES[4].encode(), LINES[5].encode()]
        # Truncation in place (copytruncate), then a shorter line: read from the start.
        path.write_bytes(b"")
        time.sleep(0.1)
        path.write_bytes(LINES[0].encode())
        assert follower.next() == LINES[0].encode()
        # A file that disappears and comes back.
        path.unlink()
        time.sleep(0.1)
        path.write_bytes(LINES[6].encode())
        assert follower.next() == LINES[6].encode()
    finally:
        code, err = follower.stop()
    assert code == 130
    assert "skipped 1 malformed line(s)" in err


def test_follow_starts_at_the_end_and_filters(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    path.write_bytes(LINES[11].encode())  # an old conn.closed: not shown
    follower = Follower("--json", "--event", "conn.closed", str(path))
    try:
        # Keep appending until the follower, once at the end, shows one.
        new = closed(20, BOB, code=4000).encode()
        deadline = time.monotonic() + within(10)
        got = None
        while got is None and time.monotonic() < deadline:
            append(path, LINES[0].encode() + new)
            with contextlib.suppress(queue.Empty):
                got = follower.lines.get(timeout=0.1)
        assert got == new
    finally:
        follower.stop()


def test_a_tail_in_process(tmp_path: Path) -> None:
    # The same states as above without a process: start, partial line, rotation, truncation.
    path = tmp_path / "server.log"
    path.write_bytes(b"old\n")
    tail = Tail(str(path), from_end=True)
    try:
        assert tail.read() == []
        append(path, b"one\ntw")
        assert tail.read() == [b"one\n"]
        append(path, b"o\n")
        assert tail.read() == [b"two\n"]
        path.rename(tmp_path / "server.log.1")
        append(tmp_path / "server.log.1", b"late")  # no newline: given as it is
        path.write_bytes(b"new\n")
        # The old file to its end (a last line without its newline too), then the new one.
        assert tail.read() == [b"late", b"new\n"]
        path.write_bytes(b"")
        assert tail.read() == []
        append(path, b"x\n")
        assert tail.read() == [b"x\n"]
    finally:
        tail.close()
