#!/usr/bin/env python3
"""Heavy legal load, reconnect-replay and frame-flood attacks against a spawned ``wstally serve``.

    python benchmarks/attacks.py heavy  [--senders 16 --rate 10000 --watchers 100 --duration 20]
    python benchmarks/attacks.py replay [--attackers 600 --behind 100000 --duration 20]
    python benchmarks/attacks.py flood  [--kinds ping,text --flooders 1 --duration 15]

Each run starts its own server (``wstally serve`` on a SQLite database in a temporary
directory, ``--log-format json --stats-interval 1``, pinned to one core with ``taskset``) on
127.0.0.1, loads it from this process pinned to another core, and stops it at the end. Only
loopback is ever targeted, and every count and duration has a hard upper bound.

* ``heavy``: N senders pacing ~R adds/s each (big deltas, 32-character names) plus W
  watchers using websockets' defaults (1 MiB max_size) that read everything. Reports the
  largest frame any client received, the server's RSS every second, ack latency (from the
  moment the add was written), adds acked/s, clients still connected, commit batch_max.
* ``replay``: a few well-behaved senders (paced, latency from the *intended* send time)
  and watchers on a server prefilled with ``--prefill`` updates; a baseline phase, then a
  phase during which A attackers each send one hello asking for (nearly) the last
  ``--behind`` updates and never read again, then ``--after`` seconds with them still there.
* ``flood``: the same well-behaved load; a baseline phase, then one phase per flood kind in
  which ``--flooders`` clients send pings (or the text ``x``) as fast as they can, each
  reconnecting as soon as it is closed. Also times new connections and ``/healthz``.

``--server-rev REV`` runs the server from ``src/`` of a git revision (so that work in
progress in the tree is not what gets measured); ``--quiet-wait`` waits for the shared
machine to calm down before each run, and every table shows how much CPU other processes
took on the server's core during the run: on a shared 2-core machine that is the noise.

The well-behaved clients and watchers are ``websockets.asyncio.client`` connections. Two
roles need less CPU per frame than websockets can give on one core and speak the wire
protocol directly: the heavy senders (160,000 adds/s and their acks) and the replay
attackers (a socket that is never read after the handshake). Flooders handshake with
websockets and write their frames straight to its transport, as fast as it takes them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ipaddress
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar, cast

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State
from websockets.typing import Subprotocol

HOST = "127.0.0.1"  # the only target this script ever connects to
SUBPROTOCOL = Subprotocol("wstally.v1")
BIG = 10**15  # ±BIG alternating: 16 senders keep the total within int64
MASK0 = b"\x00\x00\x00\x00"  # a zero mask key: XOR is the identity, the server cannot tell
ACK = b'{"type":"ack","id":"'
ERROR = b'{"type":"error"'
UPDATES = re.compile(rb'\{"type":"updates","seq":(\d+),"total":-?\d+,"items":\[\{"seq":(\d+),')
SNAPSHOT = b'{"type":"snapshot"'

# Hard bounds, whatever the command line says.
MAX_PHASE = 120.0
MAX_SENDERS = 64
MAX_WATCHERS = 2000
MAX_ATTACKERS = 2000
MAX_FLOODERS = 8
MAX_PREFILL = 500_000
MAX_RUNS = 5

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Small helpers


def now() -> float:
    return time.monotonic()


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame (FIN set)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + MASK0 + payload


def sender_name(index: int, kind: str) -> str:
    """A 32-character hello name. ``astral`` uses characters outside the BMP, each escaped
    by the server as a 12-byte surrogate pair: the largest an updates item can get."""
    if kind == "astral":
        return "\U0001d54f" * 32
    return f"heavy-sender-{index:03d}-".ljust(32, "x")


def url(port: int) -> str:
    return f"ws://{HOST}:{port}/"


def pct(values: Sequence[int] | array[int], unit: float = 1000.0) -> dict[str, float | int]:
    """Nearest-rank percentiles of microsecond values, in milliseconds."""
    n = len(values)
    if n == 0:
        return {"count": 0}
    s = sorted(values)

    def at(q: float) -> float:
        return round(s[max(0, math.ceil(q * n) - 1)] / unit, 2)

    return {
        "count": n,
        "p50_ms": at(0.50),
        "p90_ms": at(0.90),
        "p99_ms": at(0.99),
        "p999_ms": at(0.999),
        "max_ms": round(s[-1] / unit, 2),
    }


def median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def use_uvloop() -> Callable[[Awaitable[T]], T]:
    try:
        import uvloop

        return cast(Callable[[Awaitable[T]], T], uvloop.run)
    except ImportError:  # pragma: no cover - uvloop is optional
        return cast(Callable[[Awaitable[T]], T], asyncio.run)


def pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(0, {cpu})


# ---------------------------------------------------------------------------------------------
# The server under test


class Server:
    """``wstally serve`` on a fresh SQLite database, on a free loopback port."""

    def __init__(self, cpu: int | None, extra: Sequence[str], src: str | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="wstally-attacks-")
        self.db = Path(self.tmp.name) / "tally.db"
        self.log_path = Path(self.tmp.name) / "server.log"
        command = [
            sys.executable,
            "-m",
            "wstally",
            "serve",
            "--db",
            str(self.db),
            "--host",
            HOST,
            "--port",
            "0",
            "--log-format",
            "json",
            "--stats-interval",
            "1",
            *extra,
        ]
        preexec: Callable[[], None] | None = None
        if cpu is not None and (os.cpu_count() or 1) > cpu:
            if shutil.which("taskset"):
                command = ["taskset", "-c", str(cpu), *command]
            else:

                def preexec() -> None:
                    os.sched_setaffinity(0, {cpu})

        self.pinned = cpu is not None and (os.cpu_count() or 1) > cpu
        self.cpu = cpu if self.pinned else None
        self.gen_cpu: int | None = None  # set by the caller: the generator's core
        self.command = command
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ)
        if src is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            preexec_fn=preexec,
        )
        self.pid = self.proc.pid
        self.port = self._wait_started()

    def _wait_started(self) -> int:
        deadline = now() + 30
        while now() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            for event in self.events():
                if event.get("event") == "server.started":
                    port = int(event["port"])
                    self._wait_health(port, deadline)
                    return port
            time.sleep(0.05)
        raise RuntimeError("server did not start within 30 s")

    def _wait_health(self, port: int, deadline: float) -> None:
        while now() < deadline:
            try:
                healthz_sync(port)
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not answer /healthz")

    def rss_kib(self) -> int | None:
        return self._status().get("VmRSS")

    def hwm_kib(self) -> int | None:
        return self._status().get("VmHWM")

    def _status(self) -> dict[str, int]:
        found: dict[str, int] = {}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0])
        except (OSError, ValueError, IndexError):
            pass
        return found

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.pid)

    def events(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return found
        for line in text.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def cleanup(self, keep: str | None = None) -> None:
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            target = Path(keep) / f"server-{time.strftime('%Y%m%d-%H%M%S')}-{self.pid}.log"
            shutil.copyfile(self.log_path, target)
        self.tmp.cleanup()


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS


def core_seconds(cpu: int | None) -> float | None:
    """Task time (user + nice + system) every process spent on core ``cpu`` (/proc/stat)."""
    if cpu is None:
        return None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith(f"cpu{cpu} "):
                f = line.split()[1:]
                return (int(f[0]) + int(f[1]) + int(f[2])) / TICKS
    return None


def rates(
    after: dict[str, float | None], before: dict[str, float | None], seconds: float
) -> dict[str, float | None]:
    """Per-second CPU figures between two readings; ``others_on_server_core_s_per_s`` is
    what processes other than the server took of its (pinned) core: the noise."""
    out = {f"{k}_s_per_s": per_s(after.get(k), v, seconds) for k, v in before.items()}
    core = out.pop("server_core_busy_s_per_s", None)
    server = out.get("server_cpu_s_per_s")
    out["others_on_server_core_s_per_s"] = (
        None if core is None or server is None else round(max(0.0, core - server), 2)
    )
    return out


def per_s(after: float | None, before: float | None, seconds: float) -> float | None:
    if after is None or before is None or seconds <= 0:
        return None
    return round((after - before) / seconds, 2)


def healthz_sync(port: int, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=timeout) as response:
        body: dict[str, Any] = json.load(response)
        return body


async def healthz(port: int, limit: float = 10.0) -> tuple[float, dict[str, Any] | None]:
    """``GET /healthz`` on a fresh connection: (seconds, body) or (seconds, None) on failure."""
    started = now()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(HOST, port)
            request = f"GET /healthz HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
            writer.write(request.encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
        elapsed = now() - started
        return elapsed, json.loads(body)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
        return now() - started, None
    finally:
        if writer is not None:
            writer.close()


def _stamp(event: dict[str, Any]) -> float:
    text = str(event.get("timestamp", "")).rstrip("Z")
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return math.nan


def _flooded(events: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Server-side view of the connections closed for flooding, per budget (``frames``:
    every frame, pings included; ``invalid``: malformed frames): open -> conn.flood ->
    closed, and how many messages their handler took (each refused one costs an error)."""
    opened: dict[str, float] = {}
    flood: dict[str, tuple[float, str]] = {}
    rows: dict[str, list[tuple[float, float, int, int]]] = {}
    for e in events:
        conn, name = e.get("conn"), e.get("event")
        if not isinstance(conn, str):
            continue
        if name == "conn.opened":
            opened[conn] = _stamp(e)
        elif name == "conn.flood" and conn not in flood:
            flood[conn] = (_stamp(e), str(e.get("kind", "frames")))
        elif name == "conn.closed" and conn in flood and conn in opened:
            at, kind = flood[conn]
            rows.setdefault(kind, []).append(
                (
                    at - opened[conn],
                    _stamp(e) - at,
                    int(e.get("messages_in", 0)),
                    int(e.get("refused", 0)),
                )
            )
    if not rows:
        return None

    def stat(values: Sequence[float], scale: float = 1.0) -> str:
        return f"{round((median(values) or 0) * scale):,} / {round(max(values) * scale):,}"

    return {
        kind: {
            "count": len(found),
            "open_to_flood_ms": stat([r[0] for r in found], 1000),
            "flood_to_closed_ms": stat([r[1] for r in found], 1000),
            "messages_handled": stat([float(r[2]) for r in found]),
            "refused": stat([float(r[3]) for r in found]),
        }
        for kind, found in rows.items()
    }


def parse_stats(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Figures from the server's JSON log: ``server.stats`` lines and notable events."""
    stats = [e for e in events if e.get("event") == "server.stats"]
    counts = Counter(str(e.get("event")) for e in events)
    busy = [s for s in stats if s.get("updates", 0) > 0]
    return {
        "stats_lines": len(stats),
        "batch_max": max((int(s.get("batch_max", 0)) for s in stats), default=0),
        "batch_mean_max": max((float(s.get("batch_mean", 0.0)) for s in stats), default=0.0),
        "commit_max_ms": max((float(s.get("commit_max_ms", 0.0)) for s in stats), default=0.0),
        "updates_per_s_median": median([float(s["updates_per_s"]) for s in busy]),
        "updates_per_s_max": max((float(s["updates_per_s"]) for s in busy), default=0.0),
        "lagging_max": max((int(s.get("lagging", 0)) for s in stats), default=0),
        "lagged_episodes": sum(int(s.get("lagged", 0)) for s in stats),
        "server_cpu_per_s_max": max((float(s.get("cpu_s", 0.0)) for s in stats), default=0.0),
        "events": {
            name: counts[name]
            for name in (
                "conn.evicted",
                "conn.flood",
                "broadcast.lagging",
                "conn.recovered",
                "conn.not_recovered",
                "commit.slow",
                "commit.failed",
            )
            if counts[name]
        },
        "errors_logged": sum(1 for e in events if e.get("level") in ("error", "critical")),
        "flooded_conns": _flooded(events),
        # One row per server.stats line: updates/s, batch_max, commit_max_ms, cpu_s, RSS MiB.
        "series": [
            [
                round(float(s.get("updates_per_s", 0.0))),
                int(s.get("batch_max", 0)),
                round(float(s.get("commit_max_ms", 0.0))),
                round(float(s.get("cpu_s", 0.0)), 2),
                round(int(s.get("rss_kib") or 0) / 1024),
            ]
            for s in stats
        ],
    }


# ---------------------------------------------------------------------------------------------
# A raw client: a handshake and a minimal frame parser (for the roles websockets is too slow
# or too polite for)


class HandshakeError(Exception):
    pass


def handshake_request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: wstally.v1\r\nUser-Agent: wstally-attacks\r\n\r\n"
    ).encode()


class RawConn(asyncio.Protocol):
    """A JSON-mode connection. With ``read=False`` the socket is never read after the
    handshake response: what the server sends piles up in the kernel, then in its buffer."""

    def __init__(self, port: int, read: bool = True) -> None:
        loop = asyncio.get_running_loop()
        self.request = handshake_request(port)
        self.read = read
        self.upgraded: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.handshaking = True
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed_at = 0.0
        self.write_paused = False
        self.max_frame = 0
        self.frames = 0
        self.bytes_in = 0
        self.now = 0.0

    @property
    def open(self) -> bool:
        return not self.lost.done() and self.close_code is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(HandshakeError(f"connection lost: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_json(self, obj: dict[str, Any]) -> None:
        self.write(client_frame(json.dumps(obj, separators=(",", ":")).encode()))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        buf = self.buf
        buf += data
        if self.handshaking:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 16384:
                    self.upgraded.set_exception(HandshakeError("oversized response"))
                    self.abort()
                return
            status = bytes(buf[: buf.find(b"\r\n")]).decode("latin-1")
            del buf[: end + 4]
            self.handshaking = False
            if not status.startswith("HTTP/1.1 101"):
                self.upgraded.set_exception(HandshakeError(status))
                self.abort()
                return
            self.upgraded.set_result(None)
            if not self.read:
                assert self.transport is not None
                self.transport.pause_reading()
                return
        self.now = now()
        self._parse()

    def _parse(self) -> None:
        buf = self.buf
        n = len(buf)
        pos = 0
        while n - pos >= 2:
            size = buf[pos + 1] & 0x7F
            head = 2
            if size == 126:
                if n - pos < 4:
                    break
                size = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif size == 127:
                if n - pos < 10:
                    break
                size = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            end = pos + head + size
            if end > n:
                break
            opcode = buf[pos] & 0x0F
            start = pos + head
            self.frames += 1
            if size > self.max_frame:
                self.max_frame = size
            if opcode == 0x1:
                self.on_text(buf, start, end)
            elif opcode == 0x9:
                self.write(client_frame(bytes(buf[start:end]), 0xA))
            elif opcode == 0x8:
                self.close_code = (buf[start] << 8 | buf[start + 1]) if size >= 2 else 1005
                self.close_reason = bytes(buf[start + 2 : end]).decode("utf-8", "replace")
                self.closed_at = self.now
                self.write(client_frame(bytes(buf[start : start + 2]), 0x8))
                if self.transport is not None:
                    self.transport.close()
                pos = end
                break
            pos = end
        if pos:
            del buf[:pos]

    def on_text(self, buf: bytearray, start: int, end: int) -> None:
        """A text frame's payload is ``buf[start:end]`` (valid only during the call)."""


async def open_raw(port: int, factory: Callable[[], RawConn], limit: float = 30.0) -> RawConn:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(limit):
        _, proto = await loop.create_connection(factory, HOST, port)
        await proto.upgraded
    return proto


# ---------------------------------------------------------------------------------------------
# Watchers: websockets' client with its defaults (max_size 1 MiB), reading everything


@dataclass
class WatcherResult:
    connected: bool = False
    frames: int = 0
    bytes: int = 0
    max_frame: int = 0
    items: int = 0
    gaps: int = 0
    resyncs: int = 0
    open_at_end: bool = False
    close_code: int | None = None
    close_reason: str | None = None
    error: str | None = None


class Watcher:
    def __init__(self, port: int, name: str) -> None:
        self.port = port
        self.name = name
        self.r = WatcherResult()
        self.ws: ClientConnection | None = None
        self.ready = asyncio.Event()

    async def run(self) -> None:
        r = self.r
        last: int | None = None
        try:
            # Deliberately websockets' defaults: max_size 1 MiB, max_queue 16, pings.
            async with connect(url(self.port), subprotocols=[SUBPROTOCOL], open_timeout=60) as ws:
                self.ws = ws
                r.connected = True
                await ws.send(json.dumps({"type": "hello", "client": self.name}))
                self.ready.set()
                while True:
                    msg = await ws.recv(decode=False)
                    n = len(msg)
                    r.frames += 1
                    r.bytes += n
                    if n > r.max_frame:
                        r.max_frame = n
                    m = UPDATES.match(msg)
                    if m is not None:
                        seq, first = int(m[1]), int(m[2])
                        if last is not None and first != last + 1:
                            r.gaps += 1
                        r.items += seq - first + 1
                        last = seq
                    elif msg.startswith(SNAPSHOT):
                        snap = json.loads(msg)
                        if last is not None:
                            r.resyncs += 1
                        last = int(snap["seq"])
        except ConnectionClosed as exc:
            if exc.rcvd is not None:
                r.close_code, r.close_reason = exc.rcvd.code, exc.rcvd.reason
            elif exc.sent is not None:
                r.close_code, r.close_reason = exc.sent.code, f"(sent by us) {exc.sent.reason}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            r.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ready.set()

    def still_open(self) -> bool:
        return self.ws is not None and self.ws.state is State.OPEN


async def stop_watchers(watchers: Sequence[Watcher], tasks: Sequence[asyncio.Task[None]]) -> None:
    for w in watchers:
        w.r.open_at_end = w.still_open()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for w in watchers:
        if w.ws is not None and w.ws.transport is not None:
            w.ws.transport.abort()


def summarize_watchers(results: Sequence[WatcherResult]) -> dict[str, Any]:
    codes = Counter(str(r.close_code) for r in results if r.close_code is not None)
    return {
        "count": len(results),
        "connected": sum(r.connected for r in results),
        "open_at_end": sum(r.open_at_end for r in results),
        "close_codes": dict(codes),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "max_frame_bytes": max((r.max_frame for r in results), default=0),
        "frames": sum(r.frames for r in results),
        "mb_received": round(sum(r.bytes for r in results) / 1e6, 1),
        "items_median": median([float(r.items) for r in results]),
        "gaps": sum(r.gaps for r in results),
        "resyncs": sum(r.resyncs for r in results),
    }


# ---------------------------------------------------------------------------------------------
# Case 1: heavy legal load (worker processes: raw senders + websockets watchers)


@dataclass
class HeavySpec:
    port: int
    senders: list[int]
    watchers: list[int]
    rate: float
    duration: float
    drain: float
    names: str
    window: int = 0
    tick: float = 0.005


class HeavySender(RawConn):
    def __init__(self, port: int, index: int) -> None:
        super().__init__(port)
        self.index = index
        self.sent_at = array("d")
        self.lat_us = array("q")
        self.ack_sent = array("d")  # when each acked add was sent, in ack order
        self.acked = 0
        self.errors: Counter[str] = Counter()
        self.answered_errors = 0
        self.credit = 0.0
        self.acked_at_stop = 0
        self.open_at_stop = False

    def send_adds(self, count: int) -> None:
        if count <= 0 or self.transport is None or self.transport.is_closing():
            return
        parts = []
        sent_at = self.sent_at
        first = len(sent_at)
        t = now()
        for i in range(first, first + count):
            payload = b'{"type":"add","delta":%d,"id":"%d"}' % (BIG if i & 1 == 0 else -BIG, i)
            parts.append(bytes((0x81, 0x80 | len(payload))) + MASK0 + payload)
            sent_at.append(t)
        self.transport.write(b"".join(parts))

    def on_text(self, buf: bytearray, start: int, end: int) -> None:
        if buf.startswith(ACK, start):
            q = buf.index(b'"', start + 20, end)
            i = int(buf[start + 20 : q])
            sent = self.sent_at[i]
            self.lat_us.append(int((self.now - sent) * 1e6))
            self.ack_sent.append(sent)
            self.acked += 1
        elif buf.startswith(ERROR, start):
            msg = json.loads(bytes(buf[start:end]))
            self.errors[str(msg.get("code"))] += 1
            if "id" in msg:
                self.answered_errors += 1

    @property
    def answered(self) -> int:
        return self.acked + self.answered_errors


def heavy_worker(spec: HeavySpec, conn: Connection) -> None:
    """A generator process: its share of senders and watchers (pinned by inheritance)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        result = use_uvloop()(_heavy_worker(spec, conn))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    conn.send(("result", result))


async def _heavy_worker(spec: HeavySpec, conn: Connection) -> dict[str, Any]:
    port = spec.port
    watchers = [Watcher(port, f"heavy-w{i}") for i in spec.watchers]
    wtasks = [asyncio.create_task(w.run()) for w in watchers]
    await asyncio.gather(*(w.ready.wait() for w in watchers))
    senders: list[HeavySender] = []
    for i in spec.senders:
        s = await open_raw(port, lambda i=i: HeavySender(port, i))  # type: ignore[misc]
        s.send_json({"type": "hello", "client": f"heavy-s{i}", "name": sender_name(i, spec.names)})
        senders.append(cast(HeavySender, s))
    conn.send(("ready", len(senders), sum(w.r.connected for w in watchers)))
    start_at = float(await asyncio.to_thread(conn.recv))
    await asyncio.sleep(max(0.0, start_at - now()))
    stop_at = start_at + spec.duration
    burst = spec.rate * 0.05  # never more than 50 ms of adds at once: no catching up
    last = now()
    while True:
        await asyncio.sleep(spec.tick)
        t = now()
        if t >= stop_at:
            break
        dt, last = t - last, t
        for s in senders:
            s.credit = min(s.credit + spec.rate * dt, burst)
            if not s.write_paused and s.open:
                n = int(s.credit)
                if spec.window:
                    n = min(n, spec.window - (len(s.sent_at) - s.answered))
                s.send_adds(n)
                s.credit -= n
    for s in senders:
        s.acked_at_stop = s.acked
        s.open_at_stop = s.open
    for w in watchers:
        w.r.open_at_end = w.still_open()
    # Every add gets its answer: wait for the stragglers.
    drain_until = now() + spec.drain
    while now() < drain_until and any(s.open and s.answered < len(s.sent_at) for s in senders):  # noqa: ASYNC110 - polled: answers come from many protocol callbacks
        await asyncio.sleep(0.05)
    drained_at = now()
    open_states = [w.r.open_at_end for w in watchers]
    await stop_watchers(watchers, wtasks)
    for w, was_open in zip(watchers, open_states, strict=True):
        w.r.open_at_end = was_open
    lat = array("q")
    lat_sent = array("d")
    for s in senders:
        lat.extend(s.lat_us)
        lat_sent.extend(t - start_at for t in s.ack_sent)
        s.abort()
    return {
        "senders": [
            {
                "sent": len(s.sent_at),
                "acked_in_window": s.acked_at_stop,
                "acked": s.acked,
                "answered": s.answered,
                "errors": dict(s.errors),
                "open_at_end": s.open_at_stop,
                "close_code": s.close_code,
                "close_reason": s.close_reason,
                "closed_after_s": round(s.closed_at - start_at, 1) if s.close_code else None,
                "max_frame": s.max_frame,
            }
            for s in senders
        ],
        "watchers": [asdict(w.r) for w in watchers],
        "lat_us": lat,
        "lat_sent_s": lat_sent,
        "drain_s": round(drained_at - stop_at, 2),
    }


def run_heavy(args: argparse.Namespace) -> dict[str, Any]:
    server = Server(args.server_cpu, args.server_arg, args.server_src)
    server.gen_cpu = args.gen_cpu
    ctx = multiprocessing.get_context("spawn")
    procs: list[multiprocessing.process.BaseProcess] = []
    pipes: list[Connection] = []
    samples: list[tuple[float, int | None]] = []
    try:
        n = args.procs
        for k in range(n):
            spec = HeavySpec(
                port=server.port,
                senders=list(range(k, args.senders, n)),
                watchers=list(range(k, args.watchers, n)),
                rate=args.rate,
                duration=args.duration,
                drain=args.drain,
                names=args.names,
                window=args.window,
            )
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=heavy_worker, args=(spec, child), daemon=True)
            proc.start()
            procs.append(proc)
            pipes.append(parent)
        ready = [_expect(p, "ready", 120) for p in pipes]
        pids = [w.pid for w in procs if w.pid is not None]
        rss_before = server.rss_kib()
        before = _readings(server, pids)
        start_at = now() + 0.5
        for p in pipes:
            p.send(start_at)
        time.sleep(max(0.0, start_at - now()))
        stop_at = start_at + args.duration
        tick = start_at
        while now() < stop_at:
            tick += args.sample
            time.sleep(max(0.0, min(tick, stop_at) - now()))
            samples.append((round(now() - start_at, 1), server.rss_kib()))
        after = _readings(server, pids)
        health_end = healthz_sync(server.port, timeout=30)
        # Keep sampling while the senders wait for their last answers.
        results: list[Any] = [None] * len(pipes)
        deadline = now() + args.drain + 60
        while any(r is None for r in results) and now() < deadline:
            tick += args.sample
            for k, p in enumerate(pipes):
                if results[k] is None and p.poll(max(0.0, tick - now()) / len(pipes)):
                    results[k] = _expect(p, "result", 1)
            if now() >= tick - 0.01:
                samples.append((round(now() - start_at, 1), server.rss_kib()))
        if any(r is None for r in results):
            raise RuntimeError("a generator process sent no result")
        hwm = server.hwm_kib()
    finally:
        for worker in procs:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
        code = server.stop()
    stats = parse_stats(server.events())
    server.cleanup(args.keep_logs)
    senders = [s for r in results for s in r["senders"]]
    watchers = [WatcherResult(**w) for r in results for w in r["watchers"]]
    lat = array("q")
    lat_sent = array("d")
    for r in results:
        lat.extend(r["lat_us"])
        lat_sent.extend(r["lat_sent_s"])
    sent = sum(s["sent"] for s in senders)
    acked_window = sum(s["acked_in_window"] for s in senders)
    errors: Counter[str] = Counter()
    for s in senders:
        errors.update(s["errors"])
    rss = [v for t, v in samples if v is not None and t <= args.duration + 0.05]
    rss_all = [v for _, v in samples if v is not None]
    return {
        "config": {
            "senders": args.senders,
            "rate_per_sender": args.rate,
            "watchers": args.watchers,
            "duration_s": args.duration,
            "names": args.names,
            "window": args.window or "unbounded",
            "generator_procs": args.procs,
            "connected": [r[1:] for r in ready],
        },
        "adds_sent": sent,
        "adds_sent_per_s": round(sent / args.duration),
        "adds_sent_per_sender_per_s": round(sent / args.duration / max(1, args.senders)),
        "adds_acked_per_s": round(acked_window / args.duration),
        "unanswered_after_drain": sent - sum(s["answered"] for s in senders),
        "errors": dict(errors),
        "ack_latency": pct(lat),
        "ack_latency_by_send_time": _by_second(lat, lat_sent, args.duration),
        "largest_frame_watchers": max((w.max_frame for w in watchers), default=0),
        "largest_frame_senders": max((s["max_frame"] for s in senders), default=0),
        "watchers": summarize_watchers(watchers),
        "senders_open_at_end": sum(s["open_at_end"] for s in senders),
        "sender_close_codes": dict(
            Counter(
                f"{s['close_code']} {s['close_reason']!r} at {s['closed_after_s']} s"
                for s in senders
                if s["close_code"] is not None
            )
        ),
        "rss_kib": {
            "before": rss_before,
            "min": min(rss, default=None),
            "max": max(rss, default=None),
            "last": rss[-1] if rss else None,
            "max_incl_drain": max(rss_all, default=None),
            "hwm": hwm,
            "samples": samples,
        },
        **rates(after, before, args.duration),
        "healthz_end": health_end,
        "server": stats,
        "server_exit": code,
        "drain_s": max(r["drain_s"] for r in results),
    }


def _readings(server: Server, gen_pids: Sequence[int]) -> dict[str, float | None]:
    """CPU of the server, of its core, of the generator processes and of their core."""
    gen_cpu = [cpu_seconds(pid) for pid in gen_pids]
    return {
        "server_cpu": server.cpu_seconds(),
        "server_core_busy": core_seconds(server.cpu),
        "gen_cpu": None if None in gen_cpu else sum(cast(list[float], gen_cpu)),
        "gen_core_busy": core_seconds(server.gen_cpu),
    }


def _by_second(
    lat: Sequence[int], sent: Sequence[float], duration: float, step: float = 2.0
) -> list[Any]:
    """Ack latency p50 / p99 (ms) of the adds sent in each ``step`` seconds of the run."""
    buckets: dict[int, list[int]] = {}
    for us, t in zip(lat, sent, strict=True):
        buckets.setdefault(int(t // step), []).append(us)
    rows: list[Any] = []
    for k in range(math.ceil(duration / step)):
        p = pct(buckets.get(k, []))
        rows.append([k * step, p.get("p50_ms"), p.get("p99_ms"), p.get("count", 0)])
    return rows


def _expect(pipe: Connection, kind: str, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise RuntimeError(f"a generator process sent no {kind} within {timeout:g} s")
    message = pipe.recv()
    if message[0] != kind:
        raise RuntimeError(f"generator process: {message[1:]}")
    return message if kind == "ready" else message[1]


# ---------------------------------------------------------------------------------------------
# Well-behaved load for the attack cases (websockets clients), phases and probes


class NormalSender:
    """Paced adds with ids; latency from each add's *intended* send time to its ack."""

    def __init__(self, port: int, index: int, rate: float, window: int) -> None:
        self.port = port
        self.index = index
        self.rate = rate
        self.window = window
        self.intended = array("d")
        self.lat_us = array("q")  # -1 until answered
        self.answered = 0
        self.errors: Counter[str] = Counter()
        self.close_code: int | None = None
        self.error: str | None = None
        self.ws: ClientConnection | None = None
        self._acked = asyncio.Event()
        self.ready = asyncio.Event()

    async def run(self, start_at: float, stop: asyncio.Event) -> None:
        try:
            async with connect(url(self.port), subprotocols=[SUBPROTOCOL], open_timeout=60) as ws:
                self.ws = ws
                await ws.send(json.dumps({"type": "hello", "client": f"normal-{self.index}"}))
                reader = asyncio.create_task(self._read(ws))
                self.ready.set()
                await asyncio.sleep(max(0.0, start_at - now()))
                i = 0
                while not stop.is_set() and not reader.done():
                    due = int((now() - start_at) * self.rate)
                    while i < due and not stop.is_set():
                        if i - self.answered >= self.window:
                            self._acked.clear()
                            with contextlib.suppress(asyncio.TimeoutError):
                                await asyncio.wait_for(self._acked.wait(), 0.05)
                            continue
                        self.intended.append(start_at + i / self.rate)
                        self.lat_us.append(-1)
                        delta = 1 if i & 1 == 0 else -1
                        await ws.send(f'{{"type":"add","delta":{delta},"id":"{i}"}}')
                        i += 1
                    await asyncio.sleep(0.002)
                # Let the last answers arrive (bounded by the caller's drain).
                while not reader.done() and self.answered < len(self.intended):
                    self._acked.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._acked.wait(), 0.1)
                reader.cancel()
        except ConnectionClosed as exc:
            self.close_code = exc.rcvd.code if exc.rcvd is not None else None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ready.set()

    async def _read(self, ws: ClientConnection) -> None:
        try:
            while True:
                msg = await ws.recv(decode=False)
                if msg.startswith(ACK):
                    q = msg.index(b'"', 20)
                    i = int(msg[20:q])
                    self.lat_us[i] = int((now() - self.intended[i]) * 1e6)
                    self.answered += 1
                    self._acked.set()
                elif msg.startswith(ERROR):
                    err = json.loads(msg)
                    self.errors[str(err.get("code"))] += 1
                    if "id" in err:
                        self.answered += 1
                        self._acked.set()
        except ConnectionClosed as exc:
            self.close_code = exc.rcvd.code if exc.rcvd is not None else None
            self._acked.set()

    def latencies(self, start: float, end: float) -> tuple[list[int], int]:
        """(latencies of adds intended in [start, end), how many of them got no answer)."""
        lat: list[int] = []
        missing = 0
        for t, us in zip(self.intended, self.lat_us, strict=True):
            if start <= t < end:
                if us >= 0:
                    lat.append(us)
                else:
                    missing += 1
        return lat, missing


@dataclass
class Probe:
    at: float
    connect_s: float | None
    healthz_s: float | None


class Prober:
    """Every ``interval``: open a new JSON connection (until its snapshot), and GET /healthz."""

    def __init__(self, port: int, interval: float) -> None:
        self.port = port
        self.interval = interval
        self.probes: list[Probe] = []

    async def run(self) -> None:
        while True:
            at = now()
            connect_s = await self._connect()
            health_s, body = await healthz(self.port)
            self.probes.append(Probe(at, connect_s, health_s if body is not None else None))
            await asyncio.sleep(max(0.0, at + self.interval - now()))

    async def _connect(self) -> float | None:
        started = now()
        try:
            async with asyncio.timeout(10):
                async with connect(url(self.port), subprotocols=[SUBPROTOCOL]) as ws:
                    await ws.send('{"type":"hello","client":"probe"}')
                    while not (await ws.recv(decode=False)).startswith(SNAPSHOT):
                        pass
                    return now() - started
        except (TimeoutError, OSError, ConnectionClosed, HandshakeError):
            return None
        except Exception:
            return None


@dataclass
class Phase:
    name: str
    start: float
    end: float = 0.0
    readings_start: dict[str, float | None] = field(default_factory=dict)
    readings_end: dict[str, float | None] = field(default_factory=dict)
    health_end: dict[str, Any] | None = None
    hwm_end: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class AttackRun:
    """The well-behaved load, a resource sampler and a prober, around named phases."""

    def __init__(self, args: argparse.Namespace, server: Server) -> None:
        self.args = args
        self.server = server
        self.stop = asyncio.Event()
        self.senders = [
            NormalSender(server.port, i, args.normal_rate, args.window) for i in range(args.normal)
        ]
        self.watchers = [Watcher(server.port, f"normal-w{i}") for i in range(args.watchers)]
        self.prober = Prober(server.port, args.probe_interval)
        self.rss: list[tuple[float, int | None]] = []
        self.phases: list[Phase] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.open_at_end = 0

    async def start(self) -> None:
        self.tasks += [asyncio.create_task(w.run()) for w in self.watchers]
        await asyncio.gather(*(w.ready.wait() for w in self.watchers))
        self.start_at = now() + 0.5
        self.sender_tasks = [
            asyncio.create_task(s.run(self.start_at, self.stop)) for s in self.senders
        ]
        await asyncio.gather(*(s.ready.wait() for s in self.senders))
        self.tasks.append(asyncio.create_task(self._sample()))
        self.tasks.append(asyncio.create_task(self.prober.run()))
        await asyncio.sleep(max(0.0, self.start_at - now()) + self.args.warmup)

    async def _sample(self) -> None:
        while True:
            self.rss.append((now(), self.server.rss_kib()))
            await asyncio.sleep(self.args.sample)

    def begin(self, name: str) -> Phase:
        phase = Phase(name, now(), readings_start=self.readings())
        self.phases.append(phase)
        return phase

    async def end(self, phase: Phase) -> None:
        phase.end = now()
        phase.readings_end = self.readings()
        phase.hwm_end = self.server.hwm_kib()
        _, phase.health_end = await healthz(self.server.port, limit=30)

    def readings(self) -> dict[str, float | None]:
        """CPU of the server, of its core, of this (measuring) process and of its core."""
        return {
            "server_cpu": self.server.cpu_seconds(),
            "server_core_busy": core_seconds(self.server.cpu),
            "gen_cpu": cpu_seconds(os.getpid()),
            "gen_core_busy": core_seconds(self.server.gen_cpu),
        }

    async def finish(self) -> None:
        self.open_at_end = sum(s.ws is not None and s.ws.state is State.OPEN for s in self.senders)
        self.stop.set()
        try:
            async with asyncio.timeout(self.args.drain):
                await asyncio.gather(*self.sender_tasks, return_exceptions=True)
        except TimeoutError:
            for task in self.sender_tasks:
                task.cancel()
            await asyncio.gather(*self.sender_tasks, return_exceptions=True)
        for task in self.tasks[len(self.watchers) :]:
            task.cancel()
        await asyncio.gather(*self.tasks[len(self.watchers) :], return_exceptions=True)
        await stop_watchers(self.watchers, self.tasks[: len(self.watchers)])

    def phase_figures(self, phase: Phase) -> dict[str, Any]:
        lat: list[int] = []
        missing = 0
        for s in self.senders:
            part, miss = s.latencies(phase.start, phase.end)
            lat += part
            missing += miss
        rss = [v for t, v in self.rss if phase.start <= t <= phase.end and v is not None]
        probes = [p for p in self.prober.probes if phase.start <= p.at < phase.end]
        connects = [p.connect_s for p in probes if p.connect_s is not None]
        healths = [p.healthz_s for p in probes if p.healthz_s is not None]
        seconds = phase.end - phase.start
        readings = rates(phase.readings_end, phase.readings_start, seconds)
        return {
            "seconds": round(phase.end - phase.start, 1),
            "others_ack": pct(lat),
            "others_unanswered": missing,
            "rss_kib_min": min(rss, default=None),
            "rss_kib_max": max(rss, default=None),
            "hwm_kib_end": phase.hwm_end,
            **readings,
            "new_connection_ms": _ms_stats(connects, len(probes)),
            "healthz_ms": _ms_stats(healths, len(probes)),
            "healthz_end": phase.health_end,
            **phase.extra,
        }

    def client_figures(self) -> dict[str, Any]:
        errors: Counter[str] = Counter()
        for s in self.senders:
            errors.update(s.errors)
        return {
            "normal_senders_open_at_end": self.open_at_end,
            "normal_sender_close_codes": [s.close_code for s in self.senders if s.close_code],
            "normal_sender_failures": [s.error for s in self.senders if s.error],
            "normal_sender_errors": dict(errors),
            "watchers": summarize_watchers([w.r for w in self.watchers]),
        }


def _ms_stats(values: Sequence[float], tries: int) -> dict[str, Any]:
    ms = sorted(round(v * 1000, 1) for v in values)
    return {
        "tries": tries,
        "failed": tries - len(ms),
        "median": median(ms),
        "max": ms[-1] if ms else None,
    }


def ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
        return round(a / b, 2)
    return None


# ---------------------------------------------------------------------------------------------
# Case 2: replay amplification


async def prefill(port: int, count: int, names: str) -> float:
    """``count`` updates, fast: bursts of adds without ids (under each connection's bucket)."""
    started = now()
    health = healthz_sync(port)
    target = int(health["seq"]) + count
    per_conn = 9_000  # under the 10,000-add burst of a fresh connection
    conns: list[RawConn] = []
    for i in range(math.ceil(count / per_conn)):
        c = await open_raw(port, lambda: RawConn(port))
        c.send_json({"type": "hello", "client": f"prefill-{i}", "name": sender_name(i, names)})
        n = min(per_conn, count - i * per_conn)
        c.write(
            b"".join(
                client_frame(b'{"type":"add","delta":%d}' % (BIG if k & 1 == 0 else -BIG))
                for k in range(n)
            )
        )
        conns.append(c)
    deadline = now() + 120
    while now() < deadline:
        _, body = await healthz(port)
        if body is not None and int(body["seq"]) >= target:
            break
        await asyncio.sleep(0.2)
    else:
        raise RuntimeError("prefill did not complete within 120 s")
    for c in conns:
        c.abort()
    return now() - started


async def launch_attackers(
    port: int, count: int, behind: int, margin: int, wave: int = 100
) -> tuple[list[RawConn], dict[str, Any]]:
    """Each: handshake, one hello asking for the last ``behind`` updates, then never read.

    Attackers go in waves of ``wave``, each wave's ``since`` taken from a fresh /healthz
    (minus ``margin``): the live load moves ``seq`` on, and a hello more than 100,000
    updates behind gets a plain snapshot instead of the replay this attack is about."""
    started = now()
    conns: list[RawConn] = []
    failures: Counter[str] = Counter()
    sinces: list[int] = []
    seqs: list[int] = []

    async def one(i: int, since: int, epoch: str) -> None:
        try:
            c = await open_raw(port, lambda: RawConn(port, read=False), limit=30)
        except (TimeoutError, OSError, HandshakeError) as exc:
            failures[type(exc).__name__] += 1
            return
        c.send_json({"type": "hello", "client": f"attacker-{i}", "since": since, "epoch": epoch})
        conns.append(c)

    for first in range(0, count, wave):
        _, body = await healthz(port, limit=30)
        if body is None:
            failures["healthz"] += 1
            continue
        seq = int(body["seq"])
        since = max(0, seq - behind + margin)
        seqs.append(seq)
        sinces.append(since)
        last = min(count, first + wave)
        await asyncio.gather(*(one(i, since, str(body["epoch"])) for i in range(first, last)))
    return conns, {
        "attackers": count,
        "attackers_connected": len(conns),
        "attacker_connect_failures": dict(failures),
        "attackers_connect_s": round(now() - started, 2),
        "replay_asked_per_attacker": f"{min(seqs) - min(sinces):,}..{max(seqs) - max(sinces):,}"
        if seqs
        else None,
    }


async def run_replay(args: argparse.Namespace) -> dict[str, Any]:
    server = Server(args.server_cpu, args.server_arg, args.server_src)
    server.gen_cpu = args.gen_cpu
    attackers: list[RawConn] = []
    try:
        prefill_s = await prefill(server.port, args.prefill, args.names)
        run = AttackRun(args, server)
        await run.start()
        baseline = run.begin("baseline")
        await asyncio.sleep(args.duration)
        await run.end(baseline)
        attack = run.begin("attack")
        _, body = await healthz(server.port, limit=30)
        assert body is not None, "/healthz failed before the attack"
        evicted_before = int(body["evicted"])
        attackers, info = await launch_attackers(
            server.port, args.attackers, args.behind, args.margin
        )
        attack.extra.update(info)
        await asyncio.sleep(max(0.0, attack.start + args.duration - now()))
        await run.end(attack)
        if attack.health_end is not None:
            attack.extra["evicted_so_far"] = int(attack.health_end["evicted"]) - evicted_before
        # The attackers stay, still not reading: are they evicted, does everyone recover?
        after = run.begin("after")
        await asyncio.sleep(args.after)
        await run.end(after)
        if after.health_end is not None:
            after.extra["evicted_by_end"] = int(after.health_end["evicted"]) - evicted_before
            after.extra["clients_at_end"] = after.health_end["clients"]
        await run.finish()
        figures = {p.name: run.phase_figures(p) for p in run.phases}
    finally:
        for c in attackers:
            c.abort()
        code = server.stop()
    stats = parse_stats(server.events())
    server.cleanup(args.keep_logs)
    base99 = figures["baseline"]["others_ack"].get("p99_ms")
    return {
        "config": {
            "attackers": args.attackers,
            "behind": args.behind,
            "margin": args.margin,
            "after_s": args.after,
            "prefill": args.prefill,
            "normal_senders": args.normal,
            "normal_rate": args.normal_rate,
            "watchers": args.watchers,
            "phase_s": args.duration,
            "names": args.names,
        },
        "prefill_s": round(prefill_s, 1),
        "phases": figures,
        "p99_ratio": {
            name: ratio(f["others_ack"].get("p99_ms"), base99)
            for name, f in figures.items()
            if name != "baseline"
        },
        "clients": run.client_figures(),
        "server": stats,
        "server_exit": code,
    }


# ---------------------------------------------------------------------------------------------
# Case 3: frame floods (flooder processes, niced, on the generator's core)


@dataclass
class FloodSpec:
    port: int
    kind: str  # ping | text
    duration: float
    rate: float  # frames/s, 0 for as fast as possible
    reconnect: bool
    source: str  # the flooder's own (loopback) address: the server bans addresses


def loopback(text: str) -> str:
    if not ipaddress.ip_address(text).is_loopback or ":" in text:
        raise argparse.ArgumentTypeError(f"{text} is not an IPv4 loopback address")
    return text


def flood_worker(spec: FloodSpec, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Lower priority than the measuring process on the same core: the flooder takes only
    # the CPU the well-behaved clients leave, so their latency is the server's, not ours.
    os.nice(10)
    try:
        result = use_uvloop()(_flood(spec))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    conn.send(("result", result))


async def _flood(spec: FloodSpec) -> dict[str, Any]:
    frame = client_frame(b"", 0x9) if spec.kind == "ping" else client_frame(b"x")
    per_chunk = 4096
    chunk = frame * per_chunk
    sessions: list[dict[str, Any]] = []
    failures: Counter[str] = Counter()
    end = now() + spec.duration
    while now() < end:
        try:
            ws = await connect(
                url(spec.port),
                subprotocols=[SUBPROTOCOL],
                open_timeout=10,
                ping_interval=None,
                local_addr=(spec.source, 0),
            )
        except Exception as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            failures[type(exc).__name__ + (f" {status}" if status else "")] += 1
            await asyncio.sleep(0.05)
            continue
        drain = asyncio.create_task(_drain(ws))
        transport = ws.transport
        started = now()
        sent = 0
        closed_at: float | None = None
        credit = 0.0
        last = started
        while now() < end:
            if ws.protocol.close_rcvd is not None or transport.is_closing():
                closed_at = now()
                break
            if spec.rate:
                t = now()
                credit = min(credit + spec.rate * (t - last), spec.rate * 0.01)
                last = t
                n = int(credit)
                if n:
                    transport.write(frame * n)
                    sent += n
                    credit -= n
                await asyncio.sleep(0.001)
            elif transport.get_write_buffer_size() < 1 << 20:
                transport.write(chunk)
                sent += per_chunk
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(0.0005)
        rcvd = ws.protocol.close_rcvd
        sessions.append(
            {
                "frames_sent": sent,
                "close_code": rcvd.code if rcvd is not None else None,
                "close_reason": rcvd.reason if rcvd is not None else None,
                "time_to_close_s": None if closed_at is None else round(closed_at - started, 3),
            }
        )
        transport.abort()
        drain.cancel()
        with contextlib.suppress(BaseException):
            await drain
        if not spec.reconnect:
            break
    return {"sessions": sessions, "connect_failures": dict(failures)}


async def _drain(ws: ClientConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


def summarize_floods(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    sessions = [s for r in results for s in r["sessions"]]
    closes = [s["time_to_close_s"] for s in sessions if s["time_to_close_s"] is not None]
    failures: Counter[str] = Counter()
    for r in results:
        failures.update(r["connect_failures"])
    return {
        "flood_sessions": len(sessions),
        "flood_close_codes": dict(Counter(str(s["close_code"]) for s in sessions)),
        "flood_close_reason": next(
            (s["close_reason"] for s in sessions if s["close_reason"]), None
        ),
        "flood_time_to_close_ms": {
            "median": None if not closes else round(float(median(closes) or 0) * 1000, 1),
            "max": None if not closes else round(max(closes) * 1000, 1),
        },
        "flood_frames_sent": sum(s["frames_sent"] for s in sessions),
        "flood_frames_per_session_median": median([float(s["frames_sent"]) for s in sessions]),
        "flood_connect_failures": dict(failures),
    }


async def run_flood(args: argparse.Namespace) -> dict[str, Any]:
    server = Server(args.server_cpu, args.server_arg, args.server_src)
    server.gen_cpu = args.gen_cpu
    ctx = multiprocessing.get_context("spawn")
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        run = AttackRun(args, server)
        await run.start()
        baseline = run.begin("baseline")
        await asyncio.sleep(args.duration)
        await run.end(baseline)
        for kind in args.kinds:
            phase = run.begin(f"{kind}_flood")
            pipes: list[Connection] = []
            for _ in range(args.flooders):
                spec = FloodSpec(
                    server.port, kind, args.duration, args.flood_rate, args.reconnect, args.source
                )
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=flood_worker, args=(spec, child), daemon=True)
                proc.start()
                procs.append(proc)
                pipes.append(parent)
            await asyncio.sleep(args.duration)
            results = [
                await asyncio.to_thread(_expect, p, "result", args.duration + 60) for p in pipes
            ]
            await run.end(phase)
            phase.extra.update(summarize_floods(results))
            await asyncio.sleep(1.0)  # let the server settle between phases
        await run.finish()
        figures = {p.name: run.phase_figures(p) for p in run.phases}
    finally:
        for worker in procs:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
        code = server.stop()
    stats = parse_stats(server.events())
    server.cleanup(args.keep_logs)
    base99 = figures["baseline"]["others_ack"].get("p99_ms")
    return {
        "config": {
            "kinds": args.kinds,
            "flooders": args.flooders,
            "flood_rate": args.flood_rate or "max",
            "reconnect": args.reconnect,
            "normal_senders": args.normal,
            "normal_rate": args.normal_rate,
            "watchers": args.watchers,
            "phase_s": args.duration,
        },
        "phases": figures,
        "p99_ratio": {
            name: ratio(f["others_ack"].get("p99_ms"), base99)
            for name, f in figures.items()
            if name != "baseline"
        },
        "clients": run.client_figures(),
        "server": stats,
        "server_exit": code,
    }


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}".rstrip("0").rstrip(".") if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value) or "-"
    return str(value)


def _mib(kib: int | None) -> str:
    return _fmt(None if kib is None else round(kib / 1024, 1))


def _lat(d: dict[str, Any]) -> str:
    if not d.get("count"):
        return "-"
    return f"{d['p50_ms']} / {d['p99_ms']} / {d['max_ms']} (n={d['count']:,})"


def rows_heavy(r: dict[str, Any]) -> list[tuple[str, str]]:
    w = r["watchers"]
    rss = r["rss_kib"]
    return [
        (
            "adds sent/s (per sender)",
            f"{_fmt(r['adds_sent_per_s'])} ({_fmt(r['adds_sent_per_sender_per_s'])})",
        ),
        ("adds acked/s", _fmt(r["adds_acked_per_s"])),
        ("ack latency p50 / p99 / max ms", _lat(r["ack_latency"])),
        (
            "ack p50 ms by send time (every 2 s)",
            " ".join(_fmt(row[1]) for row in r["ack_latency_by_send_time"]),
        ),
        ("drain: seconds until all answered", _fmt(r["drain_s"])),
        ("unanswered adds after drain", _fmt(r["unanswered_after_drain"])),
        ("errors to senders", _fmt(r["errors"])),
        (
            "largest frame: watchers / senders (bytes)",
            f"{_fmt(r['largest_frame_watchers'])} / {_fmt(r['largest_frame_senders'])}",
        ),
        ("watchers open at end", f"{w['open_at_end']} / {w['count']}"),
        ("watcher close codes", _fmt(w["close_codes"])),
        ("watcher resyncs / gaps", f"{w['resyncs']} / {w['gaps']}"),
        ("watcher items received (median)", _fmt(w["items_median"])),
        ("senders open at end", f"{r['senders_open_at_end']} / {r['config']['senders']}"),
        ("sender close codes", _fmt(r["sender_close_codes"])),
        (
            "server RSS MiB before / min / max / last (max incl. drain)",
            " / ".join(
                _fmt(None if v is None else round(v / 1024, 1))
                for v in (rss["before"], rss["min"], rss["max"], rss["last"])
            )
            + f" ({_mib(rss['max_incl_drain'])})",
        ),
        (
            "server RSS MiB each second",
            " ".join(str(round(v / 1024)) if v is not None else "-" for _, v in rss["samples"]),
        ),
        (
            "server CPU / others' CPU on its core s/s",
            f"{_fmt(r['server_cpu_s_per_s'])} / {_fmt(r['others_on_server_core_s_per_s'])}",
        ),
        (
            "generator CPU / its core busy s/s",
            f"{_fmt(r['gen_cpu_s_per_s'])} / {_fmt(r['gen_core_busy_s_per_s'])}",
        ),
        (
            "commit batch_max (mean max)",
            f"{_fmt(r['server']['batch_max'])} ({_fmt(r['server']['batch_mean_max'])})",
        ),
        ("commit_max_ms", _fmt(r["server"]["commit_max_ms"])),
        (
            "server updates/s median (max)",
            "{} ({})".format(
                _fmt(r["server"]["updates_per_s_median"]), _fmt(r["server"]["updates_per_s_max"])
            ),
        ),
        (
            "server lagging max / episodes",
            f"{r['server']['lagging_max']} / {r['server']['lagged_episodes']}",
        ),
        ("server events", _fmt(r["server"]["events"])),
    ]


def rows_phases(r: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for name, f in r["phases"].items():
        p = f"[{name}] "
        rows += [
            (p + "others' ack p50 / p99 / max ms", _lat(f["others_ack"])),
            (p + "others' unanswered adds", _fmt(f["others_unanswered"])),
            (
                p + "server RSS MiB min / max",
                " / ".join(
                    _fmt(None if v is None else round(v / 1024, 1))
                    for v in (f["rss_kib_min"], f["rss_kib_max"])
                ),
            ),
            (
                p + "server VmHWM MiB at end",
                _fmt(None if f["hwm_kib_end"] is None else round(f["hwm_kib_end"] / 1024, 1)),
            ),
            (
                p + "server CPU / others' CPU on its core s/s",
                f"{_fmt(f['server_cpu_s_per_s'])} / {_fmt(f['others_on_server_core_s_per_s'])}",
            ),
            (
                p + "generator CPU / its core busy s/s",
                f"{_fmt(f['gen_cpu_s_per_s'])} / {_fmt(f['gen_core_busy_s_per_s'])}",
            ),
            (
                p + "new connection ms median / max (failed)",
                "{} / {} ({})".format(
                    _fmt(f["new_connection_ms"]["median"]),
                    _fmt(f["new_connection_ms"]["max"]),
                    f["new_connection_ms"]["failed"],
                ),
            ),
            (
                p + "/healthz ms median / max (failed)",
                "{} / {} ({})".format(
                    _fmt(f["healthz_ms"]["median"]),
                    _fmt(f["healthz_ms"]["max"]),
                    f["healthz_ms"]["failed"],
                ),
            ),
        ]
        skip = {
            "seconds",
            "others_ack",
            "others_unanswered",
            "rss_kib_min",
            "rss_kib_max",
            "hwm_kib_end",
            "server_cpu_s_per_s",
            "others_on_server_core_s_per_s",
            "gen_cpu_s_per_s",
            "gen_core_busy_s_per_s",
            "new_connection_ms",
            "healthz_ms",
            "healthz_end",
        }
        rows += [(p + k.replace("_", " "), _fmt(v)) for k, v in f.items() if k not in skip]
    rows.append(("others' p99 ack, phase / baseline", _fmt(r["p99_ratio"])))
    c = r["clients"]
    rows += [
        (
            "normal senders open at end",
            f"{c['normal_senders_open_at_end']} / {r['config']['normal_senders']}",
        ),
        ("normal sender errors", _fmt(c["normal_sender_errors"])),
        (
            "normal watchers open at end",
            f"{c['watchers']['open_at_end']} / {c['watchers']['count']}",
        ),
        (
            "normal watcher close codes / gaps",
            f"{_fmt(c['watchers']['close_codes'])} / {c['watchers']['gaps']}",
        ),
        ("largest frame to a watcher (bytes)", _fmt(c["watchers"]["max_frame_bytes"])),
        ("server events", _fmt(r["server"]["events"])),
        ("server errors logged", _fmt(r["server"]["errors_logged"])),
        (
            "server side, closed for flooding (median / max)",
            _flooded_row(r["server"]["flooded_conns"]),
        ),
    ]
    return rows


def _flooded_row(found: dict[str, Any] | None) -> str:
    if not found:
        return "-"
    return "; ".join(
        f"{kind} budget: {f['count']} conns, open->1008 {f['open_to_flood_ms']} ms, "
        f"1008->closed {f['flood_to_closed_ms']} ms, messages handled {f['messages_handled']}"
        for kind, f in found.items()
    )


def print_table(case: str, runs: Sequence[dict[str, Any]], server: str) -> None:
    table = [
        [
            ("other processes' load before the run (cores)", _fmt(r["others_busy_cores_before"])),
            *(rows_heavy(r) if case == "heavy" else rows_phases(r)),
        ]
        for r in runs
    ]
    labels = [label for label, _ in table[0]]
    width = max(len(label) for label in labels)
    header = " | ".join(f"run {i + 1}" for i in range(len(runs)))
    print(f"\n{case}: {json.dumps(runs[0]['config'])}\nserver: {server}")
    print(f"{'':{width}} | {header}")
    print(f"{'-' * width}-+-{'-' * len(header)}")
    for i, label in enumerate(labels):
        values = [rows[i][1] if i < len(rows) else "-" for rows in table]
        print(f"{label:{width}} | " + " | ".join(values))


# ---------------------------------------------------------------------------------------------
# Command line


def bounded(low: float, high: float, kind: type = float) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range [{low:g}, {high:g}]")
        return value

    return convert


def kinds(text: str) -> list[str]:
    found = [k.strip() for k in text.split(",") if k.strip()]
    if not found or any(k not in ("ping", "text") for k in found):
        raise argparse.ArgumentTypeError("use ping, text or ping,text")
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attacks.py",
        description=(
            "Heavy legal load and attacks against a wstally server this script spawns on "
            "127.0.0.1 (SQLite in a temporary directory); prints a table, or JSON."
        ),
    )
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common")
    g.add_argument(
        "--runs",
        type=bounded(1, MAX_RUNS, int),
        default=1,
        help="repeat the case N times, each on a fresh server (default 1)",
    )
    g.add_argument(
        "--server-cpu",
        type=int,
        default=0,
        help="core for the server (taskset -c); -1 for no pinning (default 0)",
    )
    g.add_argument(
        "--gen-cpu",
        type=int,
        default=1,
        help="core for this load generator; -1 for no pinning (default 1)",
    )
    g.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for wstally serve (repeatable), e.g. --server-arg=--rate-limit=0",
    )
    g.add_argument(
        "--sample",
        type=bounded(0.1, 10),
        default=1.0,
        help="seconds between server RSS samples (default 1)",
    )
    g.add_argument(
        "--drain",
        type=bounded(1, 120),
        default=None,
        help="seconds to wait, after the load stops, for outstanding answers "
        "(default 60 for heavy, 10 otherwise)",
    )
    g.add_argument(
        "--names",
        choices=("ascii", "astral"),
        default="ascii",
        help="32-character sender names: ASCII, or astral characters the server "
        "escapes to 12 bytes each (the largest items) (default ascii)",
    )
    g.add_argument(
        "--server-rev",
        metavar="REV",
        help="run the server from src/ of this git revision of the repository (git archive "
        "into a temporary directory), e.g. HEAD; default: the installed wstally",
    )
    g.add_argument(
        "--quiet-wait",
        type=bounded(0, 3600),
        default=0.0,
        metavar="SECS",
        help="before each run, wait up to SECS for the machine to be quiet (other "
        "processes below --quiet-below cores for 3 s) (default 0: do not wait)",
    )
    g.add_argument(
        "--quiet-below",
        type=bounded(0.01, 64),
        default=0.3,
        metavar="CORES",
        help="what counts as quiet for --quiet-wait (default 0.3 cores)",
    )
    g.add_argument(
        "--keep-logs",
        metavar="DIR",
        help="copy each server's JSON log into DIR (default: deleted with the database)",
    )
    g.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write the results as JSON to PATH (or stdout instead of the table)",
    )
    attack = argparse.ArgumentParser(add_help=False)
    a = attack.add_argument_group("well-behaved load (replay, flood)")
    a.add_argument(
        "--normal",
        type=bounded(1, MAX_SENDERS, int),
        default=4,
        help="well-behaved senders (default 4)",
    )
    a.add_argument(
        "--normal-rate",
        type=bounded(1, 10_000),
        default=1000.0,
        help="adds/s each, paced, each with an id (default 1000)",
    )
    a.add_argument(
        "--window",
        type=bounded(1, 100_000, int),
        default=1000,
        help="adds a well-behaved sender keeps unanswered at most (default 1000)",
    )
    a.add_argument(
        "--watchers",
        type=bounded(0, MAX_WATCHERS, int),
        default=4,
        help="well-behaved watchers (default 4)",
    )
    a.add_argument(
        "--probe-interval",
        type=bounded(0.1, 10),
        default=0.5,
        help="seconds between new-connection and /healthz probes (default 0.5)",
    )
    a.add_argument(
        "--warmup",
        type=bounded(0, 30),
        default=2.0,
        help="seconds of load before the first phase (default 2)",
    )

    sub = parser.add_subparsers(dest="case", required=True, metavar="CASE")
    h = sub.add_parser(
        "heavy",
        parents=[common],
        help="heavy legal load: frames, RSS, acks",
        description="16 senders x ~10k adds/s with big deltas, W watchers reading everything.",
    )
    h.add_argument(
        "--senders",
        type=bounded(1, MAX_SENDERS, int),
        default=16,
        help="sending connections, each with a 32-character name (default 16)",
    )
    h.add_argument(
        "--rate",
        type=bounded(1, 10_000),
        default=10_000.0,
        help="adds/s per sender, paced (default 10000, the server's default limit)",
    )
    h.add_argument(
        "--watchers",
        type=bounded(0, MAX_WATCHERS, int),
        default=100,
        help="websockets clients with default settings that read everything (default 100)",
    )
    h.add_argument(
        "--duration", type=bounded(1, MAX_PHASE), default=20.0, help="seconds (default 20)"
    )
    h.add_argument(
        "--procs",
        type=bounded(1, 8, int),
        default=1,
        help="generator processes sharing the senders and watchers (default 1)",
    )
    h.add_argument(
        "--window",
        type=bounded(0, 1_000_000, int),
        default=0,
        help="at most this many unanswered adds per sender, 0 for no bound: open-loop "
        "pacing, the issue's case (default 0)",
    )
    r = sub.add_parser(
        "replay",
        parents=[common, attack],
        help="reconnect-replay amplification",
        description="Baseline, then A attackers asking for a long replay and never reading.",
    )
    r.add_argument(
        "--attackers",
        type=bounded(1, MAX_ATTACKERS, int),
        default=600,
        help="connections asking for a replay and never reading (default 600)",
    )
    r.add_argument(
        "--behind",
        type=bounded(1, 100_000, int),
        default=100_000,
        help="each attacker's hello says since = seq - BEHIND (default 100000)",
    )
    r.add_argument(
        "--margin",
        type=bounded(0, 50_000, int),
        default=1_000,
        help="ask for BEHIND - MARGIN updates, so that the live load does not push the "
        "request past the server's 100,000-update replay limit (default 1000)",
    )
    r.add_argument(
        "--after",
        type=bounded(0, MAX_PHASE),
        default=10.0,
        help="seconds measured after the attack phase, attackers still connected (default 10)",
    )
    r.add_argument(
        "--prefill",
        type=bounded(1, MAX_PREFILL, int),
        default=110_000,
        help="updates committed before the run (default 110000)",
    )
    r.add_argument(
        "--duration",
        type=bounded(1, MAX_PHASE),
        default=20.0,
        help="seconds per phase (default 20)",
    )
    f = sub.add_parser(
        "flood",
        parents=[common, attack],
        help="ping and text floods",
        description="Baseline, then one phase per flood kind.",
    )
    f.add_argument("--kinds", type=kinds, default=["ping", "text"], help="ping,text (default both)")
    f.add_argument(
        "--flooders",
        type=bounded(1, MAX_FLOODERS, int),
        default=1,
        help="flooding clients, one process each (default 1)",
    )
    f.add_argument(
        "--flood-rate",
        type=bounded(0, 10_000_000),
        default=0.0,
        help="frames/s per flooder, 0 for as fast as possible (default 0)",
    )
    f.add_argument(
        "--no-reconnect",
        dest="reconnect",
        action="store_false",
        help="a flooder stops once closed (default: it reconnects and floods again)",
    )
    f.add_argument(
        "--flooder-address",
        dest="source",
        type=loopback,
        default="127.0.0.2",
        help="the flooders' source address, in 127.0.0.0/8; the well-behaved clients use "
        "127.0.0.1 (default 127.0.0.2: the server refuses a flooding address for a while)",
    )
    f.add_argument(
        "--duration",
        type=bounded(1, MAX_PHASE),
        default=15.0,
        help="seconds per phase (default 15)",
    )

    return parser


REPO = Path(__file__).resolve().parent.parent


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores' worth of CPU the whole machine used over ``seconds`` (/proc/stat)."""

    def read() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields[:8]) - idle, sum(fields[:8])

    busy0, total0 = read()
    time.sleep(seconds)
    busy1, total1 = read()
    cores = os.cpu_count() or 1
    return round((busy1 - busy0) / max(1, total1 - total0) * cores, 2)


def wait_quiet(limit: float, threshold: float) -> float:
    """Wait (at most ``limit`` s) for 3 s in a row with the machine below ``threshold``
    busy cores; returns the last reading (others' load just before the run)."""
    deadline = now() + limit
    calm = 0
    load = busy_cores()
    while limit > 0 and now() < deadline:
        calm = calm + 1 if load < threshold else 0
        if calm >= 3:
            break
        load = busy_cores()
    return load


def server_source(rev: str | None, into: Path) -> tuple[str | None, str]:
    """``src/`` of git revision ``rev`` extracted under ``into`` (None: the installed
    package), and a description of what runs."""
    if rev is None:
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        head = _git("rev-parse", "--short", "HEAD")
        return None, f"installed package (work tree at {head}{', modified' if dirty else ''})"
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "src"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return str(into / "src"), f"git {commit[:12]} ({_git('log', '-1', '--format=%s', commit)[:60]})"


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for arg in args.server_arg:
        # The script owns where the server listens and what it stores: loopback, a temp db.
        if arg.split("=", 1)[0] in ("--host", "--port", "--db", "--memory", "--log-format"):
            parser.error(f"--server-arg {arg}: this script sets that option itself")
    args.server_cpu = None if args.server_cpu < 0 else args.server_cpu
    args.gen_cpu = None if args.gen_cpu < 0 else args.gen_cpu
    if args.drain is None:
        args.drain = 60.0 if args.case == "heavy" else 10.0
    pin(args.gen_cpu)
    source_dir = tempfile.TemporaryDirectory(prefix="wstally-src-")
    args.server_src, server_desc = server_source(args.server_rev, Path(source_dir.name))
    print(f"server: {server_desc}", file=sys.stderr)
    runs: list[dict[str, Any]] = []
    for i in range(args.runs):
        others = wait_quiet(args.quiet_wait, args.quiet_below)
        print(
            f"{args.case}: run {i + 1}/{args.runs} (others using {others} cores)…",
            file=sys.stderr,
            flush=True,
        )
        started = now()
        if args.case == "heavy":
            result = run_heavy(args)
        elif args.case == "replay":
            result = use_uvloop()(asyncio.wait_for(run_replay(args), _budget(args)))
        else:
            result = use_uvloop()(asyncio.wait_for(run_flood(args), _budget(args)))
        result["wall_s"] = round(now() - started, 1)
        result["others_busy_cores_before"] = others
        runs.append(result)
    output = {
        "case": args.case,
        "command": " ".join(["python", "benchmarks/attacks.py", *(argv or sys.argv[1:])]),
        "server": server_desc,
        "pinned": {"server_cpu": args.server_cpu, "gen_cpu": args.gen_cpu},
        "runs": runs,
    }
    source_dir.cleanup()
    if args.json is not None and args.json != "-":
        Path(args.json).write_text(json.dumps(output, indent=2) + "\n")
    if args.json == "-":
        print(json.dumps(output, indent=2))
    else:
        print_table(args.case, runs, server_desc)
    return 0


def _budget(args: argparse.Namespace) -> float:
    """The most a run may take, whatever happens: phases, prefill, drain and a margin."""
    phases = 2 if args.case == "replay" else 1 + len(getattr(args, "kinds", []))
    after = getattr(args, "after", 0.0)
    return float(phases * (args.duration + 2) + after + args.warmup + args.drain + 300)


if __name__ == "__main__":
    sys.exit(main())
