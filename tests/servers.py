"""``wstally serve`` as a subprocess, for tests that need a real server process."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from helpers import within

__all__ = ["ServeProcess"]


class ServeProcess:
    """``wstally serve`` in a subprocess, with its JSON log lines collected as dicts."""

    def __init__(self, cwd: Path, *args: str, nofile: int | None = None) -> None:
        def limit_fds() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wstally", "serve", "--log-format", "json", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=limit_fds,
        )
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        try:
            for line in self.proc.stderr:
                self._take(line)
        except ValueError:
            # close() closed the pipe: a teardown that did not wait for the last lines.
            # Anything else (a line that is not UTF-8, say) is the test's to see.
            if not self.proc.stderr.closed:
                raise
        self._started.set()

    def _take(self, line: str) -> None:
        self.raw.append(line)
        try:
            event = json.loads(line)
        except ValueError:
            return
        self.events.append(event)
        if event.get("event") == "server.started":
            self._started.set()

    @property
    def port(self) -> int:
        assert self._started.wait(within(15)), "server did not start"
        started = [e for e in self.events if e.get("event") == "server.started"]
        assert started, "".join(self.raw)
        return int(started[0]["port"])

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as r:
            body: dict[str, Any] = json.load(r)
            return body

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait()

    def wait(self) -> int:
        code = self.proc.wait(timeout=within(20))
        self._reader.join(timeout=within(5))
        return code

    def event(self, name: str) -> dict[str, Any]:
        found = [e for e in self.events if e.get("event") == name]
        assert found, f"no {name} in {self.raw}"
        return found[-1]

    def close(self) -> None:
        """Kill the process if it still runs and release its pipes (test teardown)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        # The reader may still be taking the last lines (a flood logs many): let it reach
        # the end of the pipe before closing it under it.
        self._reader.join(timeout=within(5))
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
