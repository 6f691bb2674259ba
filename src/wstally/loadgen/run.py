"""The load test's coordinator: plan, spawn workers, watch progress, judge, report."""

from __future__ import annotations

import argparse
import ipaddress
import json
import multiprocessing as mp
import os
import secrets
import shlex
import socket
import ssl
import sys
import time
from array import array
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.live import Live
from rich.table import Table

from wstally.loadgen import naive_server
from wstally.loadgen.server_proc import (
    ProcReader,
    SpawnedRedis,
    SpawnedServer,
    healthz,
    redis_info,
)
from wstally.loadgen.worker import Plan, Shared, new_histogram, run_worker
from wstally.options import ws_url

__all__ = ["main"]

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
DEFAULT_URL = "ws://127.0.0.1:8765/"
RING = 1 << 20


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loadtest.py",
        description="Load a wstally server, measure it, and check that nothing was lost.",
    )
    p.add_argument(
        "--url",
        type=ws_url,
        action="append",
        help=f"server to load (ignored with --spawn) [default {DEFAULT_URL}]; repeat it for "
        "the nodes of one tally: watcher k and sender k connect to the (k mod N)th URL",
    )
    p.add_argument("--spawn", action="store_true", help="start a throwaway server for the run")
    p.add_argument(
        "--nodes",
        type=int,
        metavar="N",
        help="start a private redis-server (AOF always, temp dir, free port) and N nodes "
        "(wstally serve --redis), load them round-robin, stop them at the end (implies --spawn)",
    )
    p.add_argument(
        "--store",
        choices=("sqlite", "memory"),
        help="store of the spawned server (default sqlite in a temp dir)",
    )
    p.add_argument(
        "--server-cmd",
        metavar="CMD",
        help="command line of the spawned server instead of wstally serve "
        "(it must accept --host and --port and print a server.started JSON line)",
    )
    p.add_argument(
        "--server-cpus",
        metavar="LIST",
        action="append",
        help="pin spawned servers to these CPUs (taskset -c LIST), e.g. 0; run the generator "
        "itself under taskset -c 1 for one core each; repeated, node i gets the (i mod N)th",
    )
    p.add_argument(
        "--watchers-on",
        type=_indices,
        metavar="I,J",
        help="place watchers (and --stalled readers) only on these servers, round-robin: "
        "indices into the --url list or the --nodes, from 0 (default: all)",
    )
    p.add_argument(
        "--senders-on",
        type=_indices,
        metavar="I,J",
        help="place senders only on these servers (default: all); with --watchers-on on "
        "others, every fan-out latency measured is from a sender on another node",
    )
    p.add_argument(
        "--redis-cpus",
        metavar="LIST",
        help="pin the redis-server of --nodes to these CPUs (taskset -c LIST)",
    )
    p.add_argument(
        "--compare",
        choices=("naive",),
        help="run the same load against the naive reference server too "
        "(wstally.loadgen.naive_server; implies --spawn) and print the ratios",
    )
    p.add_argument(
        "--find-capacity",
        action="store_true",
        help="add watchers in steps until p99 fan-out latency passes --p99-limit; report the "
        "largest count that held",
    )
    p.add_argument(
        "--p99-limit",
        type=float,
        default=50.0,
        metavar="MS",
        help="fan-out p99 limit for --find-capacity (default 50 ms)",
    )
    p.add_argument(
        "--step",
        type=int,
        default=500,
        help="watchers added per --find-capacity step (default 500)",
    )
    p.add_argument(
        "--max-watchers", type=int, default=15000, help="stop --find-capacity here (default 15000)"
    )
    p.add_argument("--watchers", type=int, default=100, help="receive-only JSON connections")
    p.add_argument("--senders", type=int, default=10, help="connections sending adds")
    p.add_argument("--window", type=int, default=50, help="adds in flight per sender")
    p.add_argument("--rate", type=float, help="adds/s per sender (default: as fast as acks allow)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--duration", type=float, help="seconds of sending (default 10)")
    run.add_argument("--updates", type=int, help="total adds to send, split across senders")
    p.add_argument("--processes", type=int, default=1, help="generator worker processes")
    p.add_argument("--ramp", type=float, default=0.0, help="spread connecting over SECS")
    p.add_argument(
        "--sample-every",
        type=int,
        default=8,
        help="measure fan-out latency on every Nth seq (default 8)",
    )
    p.add_argument("--server-pid", type=int, help="read CPU and RSS of this local server")
    p.add_argument(
        "--stalled",
        type=int,
        default=0,
        metavar="N",
        help="N more connections that read their snapshot and then stop reading (the "
        "server must resync or evict them without slowing the others)",
    )
    p.add_argument("--cafile", metavar="PEM", help="trust this CA for wss:// URLs")
    p.add_argument(
        "--token",
        default=os.environ.get("WSTALLY_TOKEN"),
        help="access token for a server started with --token [env WSTALLY_TOKEN]",
    )
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="survive server restarts: reconnect, resend unanswered adds with their ids "
        "(the verdict then proves exactly-once across the crash)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback target (off by default: load only what you own)",
    )
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    args = p.parse_args(argv)
    if args.duration is None and args.updates is None:
        args.duration = 10.0
    args.url = args.url or [DEFAULT_URL]
    if args.nodes is not None:
        if args.nodes < 1:
            p.error("--nodes must be at least 1")
        for clash, given in (
            ("--store", args.store),
            ("--server-cmd", args.server_cmd),
            ("--compare", args.compare),
        ):
            if given is not None:
                p.error(f"--nodes starts wstally serve --redis nodes: it excludes {clash}")
        args.spawn = True
    args.store = args.store or "sqlite"
    servers = args.nodes or (1 if args.spawn else len(args.url))
    for option, indices in (("--watchers-on", args.watchers_on), ("--senders-on", args.senders_on)):
        if indices and max(indices) >= servers:
            p.error(f"{option}: {max(indices)} is not a server index (0 to {servers - 1})")
    return args


def _indices(text: str) -> list[int]:
    """``0,2``: server indices, for --watchers-on and --senders-on."""
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 0,1") from None
    if any(i < 0 for i in indices):
        raise argparse.ArgumentTypeError(f"{text!r}: indices start at 0")
    return indices


def _is_loopback(host: str) -> bool:
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None)
        )
    except (OSError, ValueError):
        return False


def _healthz_retrying(
    host: str, port: int, patience: float, tls: ssl.SSLContext | None, token: str | None
) -> dict[str, Any]:
    deadline = time.monotonic() + patience
    while True:
        try:
            return healthz(host, port, tls=tls, token=token)
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _percentiles(hist: HdrHistogram) -> dict[str, float]:
    if hist.get_total_count() == 0:
        return {}
    out = {f"p{p:g}": hist.get_value_at_percentile(p) / 1000 for p in PERCENTILES}
    out["max"] = hist.get_max_value() / 1000
    out["count"] = hist.get_total_count()
    return out


def _merge(encoded: list[bytes]) -> HdrHistogram:
    merged = new_histogram()
    for blob in encoded:
        merged.decode_and_add(blob)
    return merged


def _agree(bodies: list[dict[str, Any]]) -> bool:
    return len({(b.get("seq"), b.get("total"), b.get("epoch")) for b in bodies}) == 1


class LoadTest:
    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.servers: list[SpawnedServer] = []
        self.redis: SpawnedRedis | None = None
        self.figures: dict[str, Any] = {}
        self.tls = False
        self.targets: list[tuple[str, int]] = []
        self.urls: list[str] = []

    def run(self) -> int:
        args = self.args
        try:
            pids = self._spawn() if args.spawn else self._targets()
            if pids is None:
                return 2
            return self._run(pids)
        finally:
            for server in self.servers:
                server.stop()
            if self.redis is not None:
                self.redis.stop()

    def _spawn(self) -> list[int | None]:
        args = self.args
        cpus = args.server_cpus or [None]
        if args.nodes is not None:
            self.redis = SpawnedRedis(args.redis_cpus)
            for i in range(args.nodes):
                self.servers.append(
                    SpawnedServer(cpus=cpus[i % len(cpus)], redis=self.redis.url, node=f"n{i}")
                )
        else:
            command = shlex.split(args.server_cmd) if args.server_cmd else None
            self.servers.append(SpawnedServer(args.store, command, cpus[0]))
        self.targets = [(s.host, s.port) for s in self.servers]
        self.urls = [f"ws://{s.host}:{s.port}/" for s in self.servers]
        return [s.proc.pid for s in self.servers]

    def _targets(self) -> list[int | None] | None:
        """The --url targets, checked: one scheme, loopback unless allowed, answering."""
        args = self.args
        schemes = set()
        for url in args.url:
            parts = urlsplit(url)
            if parts.scheme not in ("ws", "wss") or parts.hostname is None:
                self.console.print(f"[red]unsupported URL {url}; use ws:// or wss://")
                return None
            schemes.add(parts.scheme)
            tls = parts.scheme == "wss"
            host, port = parts.hostname, parts.port or (443 if tls else 80)
            if not args.allow_remote and not _is_loopback(host):
                self.console.print(f"[red]{host} is not a loopback address; see --allow-remote")
                return None
            self.targets.append((host, port))
            self.urls.append(url)
        if len(schemes) > 1:
            self.console.print("[red]mixed ws:// and wss:// URLs; use one scheme")
            return None
        self.tls = schemes == {"wss"}
        for url, (host, port) in zip(self.urls, self.targets, strict=True):
            if not self._reachable(url, host, port):
                return None
        # --server-pid describes the first URL's server.
        return [args.server_pid] + [None] * (len(self.targets) - 1)

    def _reachable(self, url: str, host: str, port: int) -> bool:
        """Is a server answering there? One line when not, rather than a traceback."""
        tls = ssl.create_default_context(cafile=self.args.cafile) if self.tls else None
        try:
            healthz(host, port, timeout=5.0, tls=tls, token=self.args.token)
        except OSError as exc:
            reason = getattr(exc, "reason", exc)
            # Nothing listening says it all; anything else (TLS, HTTP) is worth naming.
            why = "" if isinstance(reason, ConnectionRefusedError) else f" ({reason})"
            self.console.print(
                f"no server at {url}{why}; start one or use --spawn",
                markup=False,
                highlight=False,
            )
            return False
        return True

    def _run(self, pids: list[int | None]) -> int:
        args = self.args
        ctx = mp.get_context("spawn")
        procs_n = max(1, args.processes)
        host, port = self.targets[0]
        shared = Shared(
            ready=ctx.Value("i", 0),
            go=ctx.Event(),
            stop=ctx.Event(),
            senders_done=ctx.Value("i", 0),
            final_seq=ctx.Value("q", -1),
            progress=ctx.RawArray("q", 4 * procs_n),
            send_times=ctx.RawArray("d", RING),
            results=ctx.Queue(),
            send_urls=ctx.RawArray("h", RING),
        )
        run_id = secrets.token_hex(4)
        watchers = _split(args.watchers, procs_n)
        senders = _split(args.senders, procs_n)
        stalled = _split(args.stalled, procs_n)
        per_sender = None
        if args.updates is not None:
            per_sender = max(1, args.updates // max(1, args.senders))

        def offset(parts: list[int], i: int) -> int:
            return sum(parts[:i])

        plans = [
            Plan(
                index=i,
                host=host,
                port=port,
                watchers=watchers[i],
                senders=senders[i],
                window=args.window,
                rate=args.rate,
                duration=args.duration,
                updates=per_sender,
                ramp=args.ramp,
                sample_every=args.sample_every,
                reconnect=args.reconnect,
                run_id=run_id,
                tls=self.tls,
                stalled=stalled[i],
                cafile=args.cafile,
                token=args.token,
                targets=tuple(self.targets),
                watch_on=tuple(args.watchers_on or ()),
                send_on=tuple(args.senders_on or ()),
                watcher_offset=offset(watchers, i),
                sender_offset=offset(senders, i),
                stalled_offset=offset(stalled, i),
            )
            for i in range(procs_n)
        ]
        workers = [ctx.Process(target=run_worker, args=(plan, shared)) for plan in plans]
        for w in workers:
            w.start()
        procs = [ProcReader(pid) if pid is not None else None for pid in pids]
        results: list[dict[str, Any]] = []
        try:
            results = self._drive(shared, workers, procs)
        except KeyboardInterrupt:
            for w in workers:
                w.kill()  # an interrupted run has nothing to report
            raise
        finally:
            for w in workers:
                w.join(timeout=10)
                if w.is_alive():
                    w.kill()
        return self._judge(results)

    def _positions(self, patience: float) -> list[dict[str, Any]]:
        """Every target's /healthz; with several, until they agree or ``patience`` is over
        (a node's position follows the shared feed: it may trail another by a moment)."""
        deadline = time.monotonic() + patience
        while True:
            wait = max(0.0, deadline - time.monotonic())
            bodies = [
                _healthz_retrying(host, port, wait, self.health_tls, self.args.token)
                for host, port in self.targets
            ]
            if _agree(bodies) or time.monotonic() >= deadline:
                return bodies
            time.sleep(0.05)

    def _redis_stats(self) -> dict[str, dict[str, str]]:
        if self.redis is None:
            return {}
        host, port = self.redis.host, self.redis.port
        return {section: redis_info(host, port, section) for section in ("cpu", "commandstats")}

    def _drive(
        self,
        shared: Shared,
        workers: list[Any],
        procs: list[ProcReader | None],
    ) -> list[dict[str, Any]]:
        args = self.args
        n = len(workers)
        t_connect = time.monotonic()
        while shared.ready.value < n:
            if not any(w.is_alive() for w in workers):
                break
            time.sleep(0.02)
        self.connect_wall = time.monotonic() - t_connect
        self.health_tls = ssl.create_default_context(cafile=args.cafile) if self.tls else None
        several = len(self.targets) > 1
        self.starts = self._positions(3.0 if several else 0.0)
        self.start = max(self.starts, key=lambda b: int(b["seq"]))
        self.procs = procs
        self.cpu0s = [p.cpu_seconds() if p else None for p in procs]
        self.mems_before = [p.memory_kib() if p else {} for p in procs]
        redis_pid = self.redis.proc.pid if self.redis and self.redis.proc else None
        self.redis_proc = ProcReader(redis_pid) if redis_pid else None
        self.redis0 = self._redis_stats()
        self.redis_cpu0 = self.redis_proc.cpu_seconds() if self.redis_proc else None
        shared.go.set()
        t0 = time.monotonic()
        live = (
            None
            if args.quiet or not self.console.is_terminal
            else Live(console=self.console, refresh_per_second=4, transient=True)
        )
        last_print = t0
        if live is not None:
            live.start()
        try:
            while shared.senders_done.value < n:
                elapsed = time.monotonic() - t0
                if args.duration is not None and elapsed >= args.duration:
                    shared.stop.set()
                if not any(w.is_alive() for w in workers):
                    break
                line = self._progress_line(shared, n, elapsed)
                if live is not None:
                    live.update(line)
                elif not args.quiet and time.monotonic() - last_print >= 2:
                    self.console.print(line)
                    last_print = time.monotonic()
                time.sleep(0.25)
        finally:
            if live is not None:
                live.stop()
        self.send_wall = time.monotonic() - t0
        self.mems_during = [p.memory_kib() if p else {} for p in procs]
        patience = 30.0 if args.reconnect else 10.0 if several else 0.0
        self.finals = self._positions(patience)
        # The furthest node: the others can only be behind it (and the verdict says so).
        self.final = max(self.finals, key=lambda b: int(b["seq"]))
        shared.final_seq.value = int(self.final["seq"])
        results: list[dict[str, Any]] = []
        deadline = time.monotonic() + 120
        while len(results) < n and time.monotonic() < deadline:
            try:
                results.append(shared.results.get(timeout=1))
            except Exception:  # queue.Empty: keep waiting while workers live
                if not any(w.is_alive() for w in workers) and shared.results.empty():
                    break
        self.cpu1s = [p.cpu_seconds() if p else None for p in procs]
        self.mems_after = [p.memory_kib() if p else {} for p in procs]
        self.redis_cpu1 = self.redis_proc.cpu_seconds() if self.redis_proc else None
        self.redis1 = self._redis_stats()
        return results

    def _progress_line(self, shared: Shared, n: int, elapsed: float) -> str:
        p = shared.progress
        acked = sum(p[i * 4] for i in range(n))
        items = sum(p[i * 4 + 1] for i in range(n))
        errors = sum(p[i * 4 + 2] for i in range(n))
        conns = sum(p[i * 4 + 3] for i in range(n))
        rate = acked / elapsed if elapsed else 0
        deliveries = items / elapsed if elapsed else 0
        return (
            f"{elapsed:6.1f}s  connections {conns:,}  acked {acked:,} ({rate:,.0f}/s)  "
            f"deliveries {deliveries:,.0f}/s  errors {errors:,}"
        )

    def _judge(self, results: list[dict[str, Any]]) -> int:
        args = self.args
        checks: list[tuple[bool, str]] = []
        fatal = [r["fatal"] for r in results if "fatal" in r]
        good = [r for r in results if "fatal" not in r]
        checks.append(
            (
                not fatal and len(results) == max(1, args.processes),
                "every generator process finished" + (f": {fatal}" if fatal else ""),
            )
        )
        acked = sum(r["acked"] for r in good)
        sent = sum(r["sent"] for r in good)
        delta_sum = sum(r["delta_sum"] for r in good)
        refused: dict[str, int] = {}
        for r in good:
            for code, count in r["refused"].items():
                refused[code] = refused.get(code, 0) + count
        start_seq, start_total = int(self.start["seq"]), int(self.start["total"])
        final_seq, final_total = int(self.final["seq"]), int(self.final["total"])
        failed = sum(r["connect_failed"] for r in good)
        checks.append(
            (failed == 0, f"{failed} connections failed" if failed else "every connection opened")
        )
        unanswered = sum(r["unanswered"] for r in good)
        checks.append(
            (
                unanswered == 0,
                f"{unanswered} adds never answered" if unanswered else "every add was answered",
            )
        )
        checks.append(
            (
                final_total == start_total + delta_sum,
                f"server total {final_total} == start {start_total} + acked deltas {delta_sum}"
                if final_total == start_total + delta_sum
                else f"server total {final_total} != start {start_total} + acked deltas "
                f"{delta_sum} (off by {final_total - start_total - delta_sum})",
            )
        )
        applied = final_seq - start_seq
        checks.append((applied == acked, f"server applied {applied} updates, {acked} acked"))
        seqs = array("q")
        for r in good:
            seqs.frombytes(r["acked_seqs"])
        unique = len(set(seqs))
        in_range = all(start_seq < s <= final_seq for s in seqs)
        checks.append(
            (
                unique == len(seqs) and in_range,
                "every ack has its own seq within the run"
                if unique == len(seqs) and in_range
                else f"{len(seqs) - unique} acks share a seq; in range: {in_range}",
            )
        )
        dups = sum(r["duplicates"] for r in good)
        checks.append((dups == 0, f"{dups} acks flagged duplicate for adds sent once"))
        states: set[tuple[int, int]] = set()
        for r in good:
            states.update(tuple(s) for s in r["watcher_states"])
        behind = sum(r["watchers_behind"] for r in good)
        same = states <= {(final_seq, final_total)} and behind == 0
        checks.append(
            (
                same,
                "every watcher ended on the server's seq and total"
                if same
                else f"watchers ended on {sorted(states)[:5]}, server on "
                f"{(final_seq, final_total)}; {behind} behind",
            )
        )
        gaps = sum(r["gaps"] for r in good)
        examples = [g for r in good for g in r["gap_examples"]][:3]
        checks.append(
            (
                gaps == 0,
                "no watcher saw a gap"
                if gaps == 0
                else f"{gaps} gaps not covered by a snapshot, e.g. {examples}",
            )
        )
        checks.append(_one_order(good))
        if len(self.targets) > 1:
            checks.append(self._one_position())
        passed = all(ok for ok, _ in checks)

        figures = self._figures(good, acked, sent, refused)
        self._print(figures, checks, passed)
        self.figures = {
            "pass": passed,
            "checks": [{"ok": ok, "what": what} for ok, what in checks],
            **figures,
        }
        if args.json:
            with open(args.json, "w") as out:
                json.dump(self.figures, out, indent=2)
        return 0 if passed else 1

    def _one_position(self) -> tuple[bool, str]:
        """Every node of the tally at one position (seq, total, epoch), at start and end."""
        for when, bodies in (("start", self.starts), ("end", self.finals)):
            if not _agree(bodies):
                seen = [(b.get("seq"), b.get("total"), b.get("epoch")) for b in bodies]
                return False, f"the nodes disagree at the {when}: (seq, total, epoch) {seen}"
        n = len(self.finals)
        return True, f"all {n} nodes reported one seq, total and epoch at the start and the end"

    def _figures(
        self, good: list[dict[str, Any]], acked: int, sent: int, refused: dict[str, int]
    ) -> dict[str, Any]:
        args = self.args
        run_seconds = max((r["run_seconds"] for r in good), default=0.0) or 1e-9
        send_seconds = max((r["send_seconds"] for r in good), default=0.0) or 1e-9
        items = sum(r["items"] for r in good)
        gen_cpu = [r["cpu_seconds"] / max(r["run_seconds"], 1e-9) for r in good]
        figures: dict[str, Any] = {
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "connections": sum(r["connected"] for r in good),
            "connect_failed": sum(r["connect_failed"] for r in good),
            "connect_seconds": round(self.connect_wall, 3),
            "handshakes_per_s": round(
                sum(r["connected"] for r in good) / max(self.connect_wall, 1e-9), 1
            ),
            "connect_ms": _percentiles(_merge([r["connect_hist"] for r in good])),
            "sent": sent,
            "acked": acked,
            "refused": refused,
            "ingest_per_s": round(acked / send_seconds, 1),
            "deliveries": items,
            "deliveries_per_s": round(items / run_seconds, 1),
            "send_seconds": round(send_seconds, 3),
            "run_seconds": round(run_seconds, 3),
            "ack_ms": _percentiles(_merge([r["ack_hist"] for r in good])),
            "fanout_ms": _percentiles(_merge([r["fanout_hist"] for r in good])),
            "snapshots_seen": sum(r["snapshots"] for r in good),
            "reconnects": sum(r["reconnects"] for r in good),
            "stalled": sum(r["stalled"] for r in good),
            # A reader that stopped reading cannot see its own eviction: ask the servers.
            "evicted_by_server": sum(int(b.get("evicted", 0)) for b in self.finals)
            - sum(int(b.get("evicted", 0)) for b in self.starts),
            "resent": sum(r["resent"] for r in good),
            # Refused as too many per second, then sent again (same id) at a slower pace.
            "rate_limited": sum(r["rate_limited"] for r in good),
            # Refused as unavailable (the shared engine unreachable), then resent (same id).
            "unavailable": sum(r.get("unavailable", 0) for r in good),
            "generator_cpu": [round(c, 3) for c in gen_cpu],
            "generator_saturated": any(c > 0.9 for c in gen_cpu),
            "start": self.start,
            "final": self.final,
        }
        pairs = zip(self.cpu0s, self.cpu1s, strict=True)
        cpus = [b - a for a, b in pairs if a is not None and b is not None]
        if cpus:
            # Every server measured, together (one unless several nodes were spawned).
            cpu = sum(cpus)
            rss = sum(m.get("VmRSS", 0) for m in self.mems_during)
            figures["server_cpu_seconds"] = round(cpu, 3)
            figures["server_cpu_us_per_delivery"] = round(cpu * 1e6 / max(items, 1), 4)
            figures["server_cpu_us_per_add"] = round(cpu * 1e6 / max(acked, 1), 2)
            figures["server_rss_kib"] = rss
            figures["server_peak_rss_kib"] = sum(m.get("VmHWM", 0) for m in self.mems_after)
            conns = figures["connections"]
            if conns and rss:
                figures["server_rss_kib_per_connection"] = round(rss / conns, 2)
        if len(self.targets) > 1:
            figures["nodes"] = self._node_figures(good, run_seconds, send_seconds)
            figures["fanout_same_node_ms"] = _percentiles(
                _merge([r["fanout_same_hist"] for r in good])
            )
            figures["fanout_cross_node_ms"] = _percentiles(
                _merge([r["fanout_cross_hist"] for r in good])
            )
        if self.redis0 and self.redis1:
            figures["redis"] = _redis_figures(self.redis0, self.redis1, acked)
            if self.redis_cpu0 is not None and self.redis_cpu1 is not None:
                figures["redis"]["process_cpu_seconds"] = round(
                    self.redis_cpu1 - self.redis_cpu0, 3
                )
        return figures

    def _node_figures(
        self, good: list[dict[str, Any]], run_seconds: float, send_seconds: float
    ) -> list[dict[str, Any]]:
        """Per target: its connections (placed round-robin), what they did, its CPU."""
        nodes = []
        for u, url in enumerate(self.urls):
            mine = [r["per_url"][u] for r in good]
            items = sum(m["items"] for m in mine)
            acked = sum(m["acked"] for m in mine)
            node: dict[str, Any] = {
                "url": url,
                "watchers": sum(m["watchers"] for m in mine),
                "senders": sum(m["senders"] for m in mine),
                "acked": acked,
                "ingest_per_s": round(acked / send_seconds, 1),
                "deliveries": items,
                "deliveries_per_s": round(items / run_seconds, 1),
                "fanout_ms": _percentiles(_merge([m["fanout_hist"] for m in mine])),
                "final": self.finals[u],
            }
            a, b = self.cpu0s[u], self.cpu1s[u]
            if a is not None and b is not None:
                node["cpu_seconds"] = round(b - a, 3)
                node["cpu_us_per_delivery"] = round((b - a) * 1e6 / max(items, 1), 4)
                node["rss_kib"] = self.mems_during[u].get("VmRSS")
            nodes.append(node)
        return nodes

    def _print(self, f: dict[str, Any], checks: list[tuple[bool, str]], passed: bool) -> None:
        table = Table(title="wstally load test", show_header=False)
        table.add_column("figure")
        table.add_column("value", justify="right")
        table.add_row(
            "connections",
            f"{f['connections']:,} ({f['connect_failed']} failed) in {f['connect_seconds']} s",
        )
        table.add_row("handshakes/s", f"{f['handshakes_per_s']:,.0f}")
        table.add_row("connect p50 / p99", _ms(f["connect_ms"], "p50", "p99"))
        table.add_row(
            "adds sent / acked / refused",
            f"{f['sent']:,} / {f['acked']:,} / {sum(f['refused'].values()):,}",
        )
        table.add_row("ingest (acked/s)", f"{f['ingest_per_s']:,.0f}")
        if f["rate_limited"]:
            table.add_row("rate-limited, then resent", f"{f['rate_limited']:,}")
        if f["stalled"]:
            table.add_row(
                "stalled readers / evicted by the server",
                f"{f['stalled']} / {f['evicted_by_server']}",
            )
        if f["reconnects"]:
            table.add_row("reconnects / adds resent", f"{f['reconnects']:,} / {f['resent']:,}")
        table.add_row("deliveries/s", f"{f['deliveries_per_s']:,.0f}")
        for key, label in (("ack_ms", "ack latency"), ("fanout_ms", "fan-out latency")):
            table.add_row(
                f"{label} p50/p90/p99/p99.9/max", _ms(f[key], "p50", "p90", "p99", "p99.9", "max")
            )
        if "server_cpu_seconds" in f:
            table.add_row(
                "server CPU s (µs/delivery)",
                f"{f['server_cpu_seconds']} ({f['server_cpu_us_per_delivery']})",
            )
            table.add_row(
                "server RSS / peak (KiB)", f"{f['server_rss_kib']:,} / {f['server_peak_rss_kib']:,}"
            )
        if f["unavailable"]:
            table.add_row("unavailable, then resent", f"{f['unavailable']:,}")
        for node in f.get("nodes", []):
            cpu = f", CPU {node['cpu_seconds']} s" if "cpu_seconds" in node else ""
            table.add_row(
                f"node {node['url']}",
                f"{node['watchers']:,} watchers, {node['senders']} senders, "
                f"{node['ingest_per_s']:,.0f} acked/s, {node['deliveries_per_s']:,.0f} "
                f"deliveries/s{cpu}",
            )
        if "fanout_cross_node_ms" in f:
            for key, label in (("fanout_same_node_ms", "same"), ("fanout_cross_node_ms", "other")):
                table.add_row(
                    f"fan-out, sender on the {label} node p50/p99/max",
                    _ms(f[key], "p50", "p99", "max"),
                )
        if "redis" in f:
            r = f["redis"]
            table.add_row(
                "Redis CPU s (µs/add); in scripts µs/add",
                f"{r['cpu_seconds']} ({r['cpu_us_per_add']}); {r['script_us_per_add']}",
            )
        table.add_row("generator CPU (cores)", ", ".join(f"{c:.2f}" for c in f["generator_cpu"]))
        self.console.print(table)
        if f["generator_saturated"]:
            self.console.print(
                "[yellow]warning: a generator process used >90% of a core: "
                "the generator, not the server, may be the bottleneck; "
                "add --processes"
            )
        for ok, what in checks:
            self.console.print(("[green]ok  [/] " if ok else "[red]FAIL[/] ") + what)
        self.console.print("[bold green]PASS" if passed else "[bold red]FAIL")


def _one_order(good: list[dict[str, Any]]) -> tuple[bool, str]:
    """Every watcher (on every node) saw one order: wherever two of them, or a watcher and
    an ack, tell the total after one seq, they tell the same total."""
    totals: dict[int, int] = {}
    conflicts = sum(r.get("position_conflicts", 0) for r in good)
    examples = [tuple(e) for r in good for e in r.get("position_examples", [])]
    sources = [(r["acked_seqs"], r["acked_totals"]) for r in good if "acked_totals" in r]
    sources += [(r["position_seqs"], r["position_totals"]) for r in good if "position_seqs" in r]
    for seqs_blob, totals_blob in sources:
        seqs, sums = array("q"), array("q")
        seqs.frombytes(seqs_blob)
        sums.frombytes(totals_blob)
        for seq, total in zip(seqs, sums, strict=True):
            known = totals.setdefault(seq, total)
            if known != total:
                conflicts += 1
                if len(examples) < 3:
                    examples.append((seq, known, total))
    if conflicts:
        return False, (
            f"{conflicts} disagreements on the total after a seq (seq, one total, another): "
            f"{examples[:3]}"
        )
    return True, (
        f"one order: every watcher and every ack agree on the total at {len(totals):,} seqs"
    )


def _redis_figures(
    before: dict[str, dict[str, str]], after: dict[str, dict[str, str]], acked: int
) -> dict[str, Any]:
    """Redis's own accounting over the run: its CPU, and the time inside each command."""

    def cpu(info: dict[str, str]) -> float:
        return float(info.get("used_cpu_user", 0)) + float(info.get("used_cpu_sys", 0))

    def stats(info: dict[str, str]) -> dict[str, tuple[int, int]]:
        found = {}
        for key, value in info.items():
            if key.startswith("cmdstat_"):
                fields = dict(part.split("=", 1) for part in value.split(","))
                found[key[8:]] = (int(fields["calls"]), int(fields["usec"]))
        return found

    per_add = max(acked, 1)
    used = cpu(after["cpu"]) - cpu(before["cpu"])
    start, end = stats(before["commandstats"]), stats(after["commandstats"])
    commands: dict[str, dict[str, float]] = {}
    for name, (calls, usec) in end.items():
        calls0, usec0 = start.get(name, (0, 0))
        if calls > calls0:
            commands[name] = {
                "calls": calls - calls0,
                "usec": usec - usec0,
                "usec_per_add": round((usec - usec0) / per_add, 3),
            }
    scripts = {k: v for k, v in commands.items() if k in ("evalsha", "eval")}
    script_calls = int(sum(v["calls"] for v in scripts.values()))
    script_usec = sum(v["usec"] for v in scripts.values())
    return {
        "cpu_seconds": round(used, 3),
        "cpu_us_per_add": round(used * 1e6 / per_add, 2),
        "script_calls": script_calls,
        "adds_per_script": round(acked / script_calls, 1) if script_calls else None,
        "script_us_per_add": round(script_usec / per_add, 2),
        "commands": commands,
    }


def _ms(figs: dict[str, float], *keys: str) -> str:
    if not figs:
        return "-"
    return " / ".join(f"{figs[k]:.2f}" for k in keys) + " ms"


def _compare(args: argparse.Namespace, console: Console) -> int:
    """The same load against wstally and the naive reference, one after the other."""
    results: dict[str, dict[str, Any]] = {}
    codes = []
    json_path = args.json
    naive = shlex.join(naive_server.COMMAND)
    for label, command in (("wstally", args.server_cmd), ("naive", naive)):
        console.rule(label)
        run_args = argparse.Namespace(
            **{**vars(args), "spawn": True, "server_cmd": command, "json": None}
        )
        test = LoadTest(run_args, console)
        codes.append(test.run())
        results[label] = test.figures
    table = Table(title="wstally / naive")
    for column in ("figure", "wstally", "naive", "ratio"):
        table.add_column(column, justify="right")
    ratios: dict[str, float] = {}
    for key in ("deliveries_per_s", "ingest_per_s"):
        ours, theirs = results["wstally"].get(key, 0), results["naive"].get(key, 0)
        ratio = ours / theirs if theirs else float("inf")
        ratios[key] = round(ratio, 2)
        table.add_row(key, f"{ours:,.0f}", f"{theirs:,.0f}", f"{ratio:.1f}x")
    for key in ("ack_ms", "fanout_ms"):
        ours_p, theirs_p = (results[k].get(key, {}).get("p99") for k in ("wstally", "naive"))
        if ours_p and theirs_p:
            table.add_row(
                f"{key} p99", f"{ours_p:.2f}", f"{theirs_p:.2f}", f"{theirs_p / ours_p:.1f}x better"
            )
    console.print(table)
    if json_path:
        with open(json_path, "w") as out:
            json.dump({"runs": results, "ratios": ratios}, out, indent=2)
    # The naive server may fail the verdict under load; only our own verdict decides.
    return codes[0]


def _find_capacity(args: argparse.Namespace, console: Console) -> int:
    """websocket-bench style: grow the audience until fan-out p99 passes the limit."""
    steps: list[dict[str, Any]] = []
    held = 0
    watchers = args.watchers if args.watchers != 100 else args.step
    while watchers <= args.max_watchers:
        console.rule(f"{watchers:,} watchers")
        run_args = argparse.Namespace(**{**vars(args), "watchers": watchers, "json": None})
        test = LoadTest(run_args, console)
        code = test.run()
        p99 = test.figures.get("fanout_ms", {}).get("p99")
        ok = code == 0 and p99 is not None and p99 <= args.p99_limit
        steps.append(
            {
                "watchers": watchers,
                "pass": code == 0,
                "fanout_p99_ms": p99,
                "deliveries_per_s": test.figures.get("deliveries_per_s"),
                "held": ok,
            }
        )
        if not ok:
            break
        held = watchers
        watchers += args.step
    table = Table(title=f"capacity at fan-out p99 <= {args.p99_limit:g} ms")
    for column in ("watchers", "verdict", "fan-out p99 ms", "deliveries/s", "held"):
        table.add_column(column, justify="right")
    for step in steps:
        p99 = step["fanout_p99_ms"]
        table.add_row(
            f"{step['watchers']:,}",
            "PASS" if step["pass"] else "FAIL",
            "-" if p99 is None else f"{p99:.1f}",
            f"{step['deliveries_per_s'] or 0:,.0f}",
            "yes" if step["held"] else "no",
        )
    console.print(table)
    console.print(f"largest audience that held: [bold]{held:,}[/] watchers")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {"p99_limit_ms": args.p99_limit, "capacity": held, "steps": steps}, out, indent=2
            )
    return 0 if held else 1


def main(argv: Sequence[str] | None = None) -> int:
    """0 PASS, 1 FAIL, 2 usage error or no server, 130 interrupted (README, "Exit status")."""
    args = parse_args(argv)
    console = Console(stderr=False)
    try:
        if args.compare:
            return _compare(args, console)
        if args.find_capacity:
            return _find_capacity(args, console)
        return LoadTest(args, console).run()
    except KeyboardInterrupt:
        console.print("interrupted: no verdict", markup=False, highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
