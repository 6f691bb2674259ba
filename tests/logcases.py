"""A small server log to read with ``wstally logs``, and the command run in this process.

Shared by the ``test_logs_*`` modules: the lines are numbered, so that a test names the
lines it expects by index (``picked``).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from logfiles import line
from wstally import cli, logsetup

__all__ = [
    "ANN",
    "ANN_HELLO",
    "BOB",
    "LINES",
    "MALFORMED",
    "PLAIN",
    "Result",
    "closed",
    "logs",
    "picked",
    "restored_logging",
    "write_logfile",
]

ANN = {"conn": "aaaa00000001", "peer": "10.0.0.1:5000", "mode": "json"}
ANN_HELLO = {**ANN, "client": "c-ann", "name": "ann"}
BOB = {"conn": "bbbb00000002", "peer": "10.0.0.2:6000", "mode": "json", "client": "c-bob"}
PLAIN = {"conn": "cccc00000003", "peer": "10.0.0.3:7000", "mode": "plain"}


def closed(at: float, ctx: dict[str, Any], **figures: Any) -> str:
    base = {
        "duration": 1.0,
        "code": 1000,
        "reason": "",
        "messages_in": 0,
        "bytes_in": 0,
        "frames_out": 0,
        "bytes_out": 0,
        "applied": 0,
        "duplicates": 0,
        "refused": 0,
        "lagged": 0,
        "clients": 0,
    }
    return line(at, "info", "conn.closed", **ctx, **{**base, **figures})


LINES = [
    line(0, "info", "server.started", port=8765, seq=0),
    line(1, "info", "connection open", "websockets.server", **ANN),
    line(1, "info", "conn.opened", **ANN, clients=1),
    line(2, "info", "conn.hello", **ANN_HELLO, since=None),
    line(3, "debug", "update.applied", **ANN_HELLO, seq=1, delta=5, total=5, id="a1"),
    line(4, "info", "conn.opened", **PLAIN, clients=2),
    line(5, "debug", "update.applied", **PLAIN, seq=2, delta=-2, total=3, id=None),
    line(6, "info", "update.refused", **PLAIN, code="bad_number", id=None, input="five"),
    line(7, "info", "conn.opened", **{k: v for k, v in BOB.items() if k != "client"}),
    line(8, "warning", "broadcast.lagging", **BOB, buffered=300_000, limit=262_144, lagged=1),
    line(9, "debug", "store.committed", "wstally.committer", batch=2, ms=1.5, first_seq=1),
    closed(10, ANN_HELLO, duration=9.0, messages_in=3, applied=1, refused=0),
    closed(11, PLAIN, duration=7.0, code=1006, messages_in=2, applied=1, refused=1),
    line(12, "critical", "store.commit_failed", "wstally.committer", error="disk full"),
    line(13, "info", "server.stats", "wstally.stats", commit_max_ms=12.5, batch_max=3),
    closed(14, BOB, duration=6.5, code=1001, reason="going", messages_in=9, lagged=1),
]
MALFORMED = [b"not json at all\n", b"\xff\xfe\n", b"[1, 2]\n", b'{"truncated": \n']


def write_logfile(tmp_path: Path) -> Path:
    """LINES with the MALFORMED lines (and a blank one) among them; the first bad one is line 7."""
    path = tmp_path / "server.log"
    data = b"".join(text.encode() for text in LINES[:6])
    data += MALFORMED[0] + b"\n"  # and a blank line, which is no error
    data += b"".join(text.encode() for text in LINES[6:12])
    data += b"".join(MALFORMED[1:])
    data += b"".join(text.encode() for text in LINES[12:])
    path.write_bytes(data)
    return path


def restored_logging() -> Iterator[None]:
    """For an autouse fixture: the command configures logging; put the suite's back after."""
    yield
    logsetup.configure("json", os.environ.get("WSTALLY_TEST_LOG_LEVEL", "warning"))


class Result:
    def __init__(self, code: int, out: bytes, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def lines(self) -> list[str]:
        return self.out.decode().splitlines(keepends=True)


def logs(monkeypatch: pytest.MonkeyPatch, *argv: str, stdin: bytes = b"") -> Result:
    """``wstally logs ARGV`` through the real command line, in this process."""
    out, err = io.BytesIO(), io.StringIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = cli.main(["logs", *argv])
    stdout.flush()
    result = Result(code, out.getvalue(), err.getvalue())
    stdout.detach()
    return result


def picked(*indexes: int) -> list[str]:
    return [LINES[i] for i in indexes]
