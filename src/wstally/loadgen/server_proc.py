"""Throwaway servers for ``--spawn`` (and a private redis-server for ``--nodes``), and /proc
readings of a local server's CPU and memory."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["ProcReader", "SpawnedRedis", "SpawnedServer", "healthz", "redis_info"]


def healthz(
    host: str,
    port: int,
    timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    url = f"{'https' if tls else 'http'}://{host}:{port}/healthz"
    request = urllib.request.Request(url)
    if token:
        # A server with --token shows its position (seq, total) only to who presents it.
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout, context=tls) as response:
        body: dict[str, Any] = json.load(response)
        return body


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SpawnedServer:
    """``wstally serve`` (or another server command) on a free loopback port."""

    def __init__(
        self,
        store: str = "sqlite",
        command: list[str] | None = None,
        cpus: str | None = None,
        redis: str | None = None,
        node: str | None = None,
    ) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="wstally-load-")
        if command is None:
            command = [sys.executable, "-m", "wstally", "serve", "--log-format", "json"]
            db = str(Path(self.tmp.name) / "load.db")
            if redis is not None:
                command += ["--redis", redis, *(["--node", node] if node else [])]
            else:
                command += ["--memory"] if store == "memory" else ["--db", db]
        if cpus:
            command = ["taskset", "-c", cpus, *command]
        self.log_path = Path(self.tmp.name) / "server.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        port = _free_port()
        self.proc = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        self.host = "127.0.0.1"
        self.port = self._wait_for_health(port)

    def _wait_for_health(self, port: int) -> int:
        # Polling /healthz rather than reading the log: it works at any --log-level and
        # for servers that log nothing at all.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                healthz(self.host, port, timeout=1.0)
            except OSError:
                time.sleep(0.05)
                continue
            return port
        raise RuntimeError("server did not start within 30 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.tmp.cleanup()


class SpawnedRedis:
    """A private ``redis-server``: free loopback port, temporary dir, AOF fsynced before every
    reply (``appendfsync always``, so that acks are durable), killed by its pid in stop().

    The machine's shared Redis (6379) is never used: a load test must not disturb it, nor be
    disturbed by it.
    """

    SHARED_PORT = 6379

    def __init__(self, cpus: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (needed by --nodes)")
        self.tmp = tempfile.TemporaryDirectory(prefix="wstally-load-redis-")
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        # A free port can be taken between the probe and redis-server's bind: try again.
        for _ in range(5):
            self.port = _free_port()
            if self.port != self.SHARED_PORT and self._start(binary, cpus):
                return
        raise RuntimeError(f"redis-server did not start: {self._log_tail()}")

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _start(self, binary: str, cpus: str | None) -> bool:
        command = [
            binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", self.tmp.name,
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        if cpus:
            command = ["taskset", "-c", cpus, *command]
        with open(Path(self.tmp.name) / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                # Not PING: Redis answers that while it is still loading.
                redis_info(self.host, self.port, "persistence")
            except (OSError, ValueError):
                time.sleep(0.02)
                continue
            return True
        self._kill()
        return False

    def _log_tail(self) -> str:
        path = Path(self.tmp.name) / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """Kill it (by its pid) and remove its data."""
        self._kill()
        self.tmp.cleanup()


def redis_info(host: str, port: int, section: str, timeout: float = 5.0) -> dict[str, str]:
    """``INFO section`` of a Redis server, as a dict of its ``key:value`` lines."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"INFO {section}\r\n".encode())
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            reply += chunk
        head, _, body = reply.partition(b"\r\n")
        if not head.startswith(b"$"):
            raise ValueError(head.decode(errors="replace"))
        length = int(head[1:])
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            body += chunk
    found: dict[str, str] = {}
    for line in body[:length].decode().splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            found[key] = value
    return found


class ProcReader:
    """CPU seconds and memory of a local process, from /proc (Linux)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ticks = os.sysconf("SC_CLK_TCK")

    def cpu_seconds(self) -> float | None:
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / self.ticks

    def memory_kib(self) -> dict[str, int]:
        found: dict[str, int] = {}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0])
        except OSError:
            pass
        return found
