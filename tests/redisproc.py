"""A private ``redis-server`` for the tests: a free loopback port, a temporary dir, AOF always.

The machine's shared Redis (6379) is never touched: every test that needs Redis starts its own,
and kills, restarts or empties it by its pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers import within

__all__ = ["SHARED_PORT", "RedisServer", "redis_server_binary"]

SHARED_PORT = 6379


def redis_server_binary() -> str:
    """The path of redis-server; skips the test without it, or fails it when CI requires it."""
    binary = shutil.which("redis-server")
    if binary is not None:
        return binary
    if os.environ.get("WSTALLY_REQUIRE_REDIS") == "1":
        pytest.fail("redis-server is not installed, and WSTALLY_REQUIRE_REDIS=1 requires it")
    pytest.skip("redis-server is not installed (WSTALLY_REQUIRE_REDIS=1 makes this a failure)")


def _free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != SHARED_PORT:
            return port


def _ask(port: int, command: bytes) -> bytes:
    """One inline command over a fresh connection; the first line of the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=within(1)) as sock:
        sock.sendall(command + b"\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply


class RedisServer:
    """``redis-server`` with its data in ``root/data`` (survives restart() through the AOF)."""

    def __init__(self, root: Path, *extra: str) -> None:
        self.binary = redis_server_binary()
        self.root = root
        self.dir = root / "data"
        self.extra = extra
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # A free port can be taken between the probe and redis-server's bind: try again.
        for _ in range(5):
            self.port = _free_port()
            if self._spawn():
                return
        raise RuntimeError(f"redis-server did not start: {self._log_tail()}")

    def _spawn(self) -> bool:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            *self.extra,
        ]  # fmt: skip
        with open(self.root / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        return self._wait_ready()

    def _wait_ready(self) -> bool:
        """True once Redis serves commands (not only PING: it answers that while loading)."""
        assert self.proc is not None
        deadline = time.monotonic() + within(10)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if _ask(self.port, b"DBSIZE").startswith(b":"):
                    return True
            except OSError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"redis-server on port {self.port} never answered")

    def _log_tail(self) -> str:
        path = self.root / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def kill9(self) -> None:
        """SIGKILL: no shutdown, only what the AOF already holds survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=within(10))

    def restart(self) -> None:
        """Kill and start again on the same port and dir: the data comes back from the AOF."""
        self.kill9()
        if not self._spawn():
            raise RuntimeError(f"redis-server did not restart: {self._log_tail()}")

    def restart_empty(self) -> None:
        """Kill, wipe the dir, start again on the same port: Redis has lost everything."""
        self.kill9()
        shutil.rmtree(self.dir)
        self.restart()

    def pause(self) -> None:
        """SIGSTOP: Redis hangs, connections stay open, nothing is answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()  # a stopped process would not die before it is continued
        self.kill9()
