"""``wstally logs --follow``: read files as they grow, like ``tail -F``.

A followed file survives rotation (renamed away and recreated: the old file is read to its
end first) and truncation in place (``copytruncate``: read again from the start). A line
still being written is held back until its newline arrives.
"""

from __future__ import annotations

import os
import time
from typing import IO, BinaryIO

from wstally.logs.scan import Scanner

__all__ = ["Tail", "follow"]


class Tail:
    """One followed file."""

    def __init__(self, path: str, from_end: bool) -> None:
        self.path = path
        self.file: BinaryIO | None = None
        self.inode: tuple[int, int] | None = None
        self.pending = b""
        self._open(from_end)

    def _open(self, at_end: bool) -> None:
        try:
            file = open(self.path, "rb")  # noqa: SIM115 - closed in close() or on rotation
        except OSError:
            return
        st = os.fstat(file.fileno())
        self.file, self.inode = file, (st.st_dev, st.st_ino)
        if at_end:
            file.seek(0, os.SEEK_END)

    def read(self) -> list[bytes]:
        """The complete lines written since the last read (none if the file is missing)."""
        lines: list[bytes] = []
        if self.file is None:
            self._open(False)
            if self.file is None:
                return lines
        self._drain(lines)
        if not lines:
            self._check(lines)
        return lines

    def _drain(self, lines: list[bytes]) -> None:
        assert self.file is not None
        for chunk in iter(self.file.readline, b""):
            if chunk.endswith(b"\n"):
                lines.append(self.pending + chunk if self.pending else chunk)
                self.pending = b""
            else:
                # A line still being written: wait for its end.
                self.pending += chunk

    def _check(self, lines: list[bytes]) -> None:
        assert self.file is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return  # moved away, not yet recreated: keep reading the old file meanwhile
        if (st.st_dev, st.st_ino) != self.inode:
            self._rotated(lines)
        elif st.st_size < self.file.tell():
            # Truncated in place (copytruncate): start over.
            self.file.seek(0)
            self.pending = b""
            self._drain(lines)

    def _rotated(self, lines: list[bytes]) -> None:
        # Finish the old file, then start the new one from its beginning.
        assert self.file is not None
        self._drain(lines)
        if self.pending:
            lines.append(self.pending)
            self.pending = b""
        self.file.close()
        self.file = None
        self._open(False)
        if self.file is not None:
            self._drain(lines)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def follow(paths: list[str], scanner: Scanner, out: IO[bytes], poll: float, from_end: bool) -> None:
    """Scan what is added to ``paths`` until interrupted, polling every ``poll`` seconds."""
    tails = [Tail(path, from_end) for path in paths]
    try:
        while True:
            idle = True
            for tail in tails:
                lines = tail.read()
                if lines:
                    idle = False
                    scanner.scan(lines, tail.path)
            if idle:
                out.flush()
                time.sleep(poll)
    finally:
        for tail in tails:
            tail.close()
