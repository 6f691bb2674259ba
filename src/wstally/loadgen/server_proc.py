"""A throwaway server for ``--spawn``, and /proc readings of a local server's CPU and memory."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["ProcReader", "SpawnedServer", "healthz"]


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
        self, store: str = "sqlite", command: list[str] | None = None, cpus: str | None = None
    ) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="wstally-load-")
        if command is None:
            command = [sys.executable, "-m", "wstally", "serve", "--log-format", "json"]
            db = str(Path(self.tmp.name) / "load.db")
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
