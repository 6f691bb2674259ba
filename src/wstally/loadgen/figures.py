"""The figures of one run, as printed and as written to ``--json``: rates, latencies, server
CPU and memory, per-node shares and Redis's own accounting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wstally.loadgen.histograms import merge, percentiles
from wstally.loadgen.observe import Observations
from wstally.loadgen.results import WorkerResult
from wstally.loadgen.sender import SenderStats

__all__ = ["build"]

# A worker whose CPU over the run passes this share of a core may be the bottleneck.
SATURATED = 0.9
NEVER = 1e-9  # a duration to divide by when the run took none


def build(
    config: dict[str, Any], urls: list[str], good: list[WorkerResult], seen: Observations
) -> dict[str, Any]:
    """Every figure of the run (``good``: the workers that finished)."""
    figures = _load(config, good, seen)
    figures.update(_server_usage(good, seen, figures["connections"]))
    if config.get("probe"):
        # The quiet process's own acks (its worker is the last one).
        probe = max(1, int(config.get("processes") or 1))
        mine = [r for r in good if r.index == probe]
        figures["probe_ack_ms"] = _latency(mine, lambda r: r.ack_hist)
    if len(urls) > 1:
        figures["nodes"] = _nodes(urls, good, seen)
        figures["fanout_same_node_ms"] = _latency(good, lambda r: r.fanout_same_hist)
        figures["fanout_cross_node_ms"] = _latency(good, lambda r: r.fanout_cross_hist)
    if seen.before.redis and seen.after.redis:
        figures["redis"] = _redis(seen, figures["acked"])
    return figures


def _latency(good: list[WorkerResult], hist: Callable[[WorkerResult], bytes]) -> dict[str, float]:
    return percentiles(merge(hist(r) for r in good))


def _load(config: dict[str, Any], good: list[WorkerResult], seen: Observations) -> dict[str, Any]:
    run_seconds = max((r.run_seconds for r in good), default=0.0) or NEVER
    send_seconds = max((r.send_seconds for r in good), default=0.0) or NEVER
    adds = SenderStats.merge(r.adds for r in good)
    connected = sum(r.connected for r in good)
    items = sum(r.watched.items for r in good)
    gen_cpu = [r.cpu_seconds / max(r.run_seconds, NEVER) for r in good]
    return {
        # The JSON may be shared or kept: the token never goes into it.
        "config": {k: ("[redacted]" if k == "token" and v else v) for k, v in config.items()},
        "connections": connected,
        "connect_failed": sum(r.connect_failed for r in good),
        "connect_seconds": round(seen.connect_seconds, 3),
        "handshakes_per_s": round(connected / max(seen.connect_seconds, NEVER), 1),
        "connect_ms": _latency(good, lambda r: r.connect_hist),
        "sent": adds.sent,
        "acked": adds.acked,
        "refused": adds.refused,
        "ingest_per_s": round(adds.acked / send_seconds, 1),
        "deliveries": items,
        "deliveries_per_s": round(items / run_seconds, 1),
        "send_seconds": round(send_seconds, 3),
        "run_seconds": round(run_seconds, 3),
        "ack_ms": _latency(good, lambda r: r.ack_hist),
        "fanout_ms": _latency(good, lambda r: r.fanout_hist),
        "snapshots_seen": sum(r.watched.snapshots for r in good),
        "reconnects": sum(r.reconnects for r in good),
        "stalled": sum(r.stalled for r in good),
        # A reader that stopped reading cannot see its own eviction: ask the servers.
        "evicted_by_server": sum(int(b.get("evicted", 0)) for b in seen.finals)
        - sum(int(b.get("evicted", 0)) for b in seen.starts),
        "resent": adds.resent,
        # Refused as too many per second, then sent again (same id) at a slower pace.
        "rate_limited": adds.rate_limited,
        # Refused as unavailable (the shared engine unreachable), then resent (same id).
        "unavailable": adds.unavailable,
        "generator_cpu": [round(c, 3) for c in gen_cpu],
        "generator_saturated": any(c > SATURATED for c in gen_cpu),
        "start": seen.start,
        "final": seen.final,
    }


def _server_usage(good: list[WorkerResult], seen: Observations, connections: int) -> dict[str, Any]:
    """Every local server measured, together (one unless several nodes were spawned)."""
    pairs = zip(seen.before.cpu, seen.after.cpu, strict=True)
    cpus = [b - a for a, b in pairs if a is not None and b is not None]
    if not cpus:
        return {}
    cpu = sum(cpus)
    items = sum(r.watched.items for r in good)
    acked = sum(r.adds.acked for r in good)
    rss = sum(m.get("VmRSS", 0) for m in seen.during)
    usage: dict[str, Any] = {
        "server_cpu_seconds": round(cpu, 3),
        "server_cpu_us_per_delivery": round(cpu * 1e6 / max(items, 1), 4),
        "server_cpu_us_per_add": round(cpu * 1e6 / max(acked, 1), 2),
        "server_rss_kib": rss,
        "server_peak_rss_kib": sum(m.get("VmHWM", 0) for m in seen.after.memory),
    }
    if connections and rss:
        usage["server_rss_kib_per_connection"] = round(rss / connections, 2)
    return usage


def _nodes(urls: list[str], good: list[WorkerResult], seen: Observations) -> list[dict[str, Any]]:
    """Per target: its connections (placed round-robin), what they did, its CPU."""
    run_seconds = max((r.run_seconds for r in good), default=0.0) or NEVER
    send_seconds = max((r.send_seconds for r in good), default=0.0) or NEVER
    nodes = []
    for u, url in enumerate(urls):
        mine = [r.nodes[u] for r in good]
        items = sum(m.items for m in mine)
        acked = sum(m.acked for m in mine)
        node: dict[str, Any] = {
            "url": url,
            "watchers": sum(m.watchers for m in mine),
            "senders": sum(m.senders for m in mine),
            "acked": acked,
            "ingest_per_s": round(acked / send_seconds, 1),
            "deliveries": items,
            "deliveries_per_s": round(items / run_seconds, 1),
            "fanout_ms": percentiles(merge(m.fanout_hist for m in mine)),
            "final": seen.finals[u],
        }
        a, b = seen.before.cpu[u], seen.after.cpu[u]
        if a is not None and b is not None:
            node["cpu_seconds"] = round(b - a, 3)
            node["cpu_us_per_delivery"] = round((b - a) * 1e6 / max(items, 1), 4)
            node["rss_kib"] = seen.during[u].get("VmRSS")
        nodes.append(node)
    return nodes


def _redis(seen: Observations, acked: int) -> dict[str, Any]:
    """Redis's own accounting over the run: its CPU, and the time inside each command."""
    per_add = max(acked, 1)
    before, after = seen.before.redis, seen.after.redis
    used = _redis_cpu(after["cpu"]) - _redis_cpu(before["cpu"])
    commands = _command_deltas(before["commandstats"], after["commandstats"], per_add)
    scripts = [v for k, v in commands.items() if k in ("evalsha", "eval")]
    script_calls = int(sum(v["calls"] for v in scripts))
    figures: dict[str, Any] = {
        "cpu_seconds": round(used, 3),
        "cpu_us_per_add": round(used * 1e6 / per_add, 2),
        "script_calls": script_calls,
        "adds_per_script": round(acked / script_calls, 1) if script_calls else None,
        "script_us_per_add": round(sum(v["usec"] for v in scripts) / per_add, 2),
        "commands": commands,
    }
    if seen.before.redis_cpu is not None and seen.after.redis_cpu is not None:
        figures["process_cpu_seconds"] = round(seen.after.redis_cpu - seen.before.redis_cpu, 3)
    return figures


def _redis_cpu(info: dict[str, str]) -> float:
    return float(info.get("used_cpu_user", 0)) + float(info.get("used_cpu_sys", 0))


def _command_stats(info: dict[str, str]) -> dict[str, tuple[int, int]]:
    """``cmdstat_evalsha:calls=3,usec=120,...`` lines as {command: (calls, usec)}."""
    found = {}
    for key, value in info.items():
        if key.startswith("cmdstat_"):
            fields = dict(part.split("=", 1) for part in value.split(","))
            found[key.removeprefix("cmdstat_")] = (int(fields["calls"]), int(fields["usec"]))
    return found


def _command_deltas(
    before: dict[str, str], after: dict[str, str], per_add: int
) -> dict[str, dict[str, float]]:
    start, end = _command_stats(before), _command_stats(after)
    commands: dict[str, dict[str, float]] = {}
    for name, (calls, usec) in end.items():
        calls0, usec0 = start.get(name, (0, 0))
        if calls > calls0:
            commands[name] = {
                "calls": calls - calls0,
                "usec": usec - usec0,
                "usec_per_add": round((usec - usec0) / per_add, 3),
            }
    return commands
