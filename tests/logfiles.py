"""Log files shaped like the server's own JSON lines, for ``wstally logs`` tests and benchmarks.

As a script it writes a large one: ``python tests/logfiles.py OUT --mb 200 [--info]``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

__all__ = ["generate", "line", "ts"]

START = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)
_KEYS = ("conn", "peer", "mode", "client", "name")


def ts(seconds: float) -> str:
    """The timestamp ``seconds`` after START, as structlog writes it."""
    return (START + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def line(at: float, level: str, event: str, logger: str = "wstally.server", **fields: Any) -> str:
    """One JSON line in the server's key order (see logsetup._order_keys)."""
    obj: dict[str, Any] = {"timestamp": ts(at), "level": level, "event": event}
    obj["logger"] = logger
    for key in _KEYS:
        if key in fields:
            obj[key] = fields.pop(key)
    obj.update(fields)
    return json.dumps(obj) + "\n"


class _Conn:
    def __init__(self, rng: random.Random, n: int, client: str | None, name: str | None) -> None:
        self.ctx: dict[str, Any] = {
            "conn": f"{rng.getrandbits(48):012x}",
            "peer": f"10.0.{n % 250}.{rng.randint(1, 250)}:{rng.randint(30000, 60000)}",
            "mode": "json" if client else "plain",
        }
        if client:
            self.ctx["client"] = client
            self.ctx["name"] = name
        self.opened = 0.0
        self.applied = self.refused = self.messages = 0


def generate(out: TextIO, target_bytes: int, debug: bool = True, seed: int = 4) -> int:
    """Write about ``target_bytes`` of log; returns the number of lines written."""
    rng = random.Random(seed)
    clients = [(f"c{i:04d}-{rng.getrandbits(32):08x}", f"user{i}") for i in range(200)]
    written = lines = 0
    now = 0.0
    seq = total = 0
    conns: list[_Conn] = []
    next_stats = 10.0

    def emit(text: str) -> None:
        nonlocal written, lines
        out.write(text)
        written += len(text)
        lines += 1

    emit(line(now, "info", "server.started", url="ws://127.0.0.1:8765/", port=8765, seq=0))
    while written < target_bytes:
        now += rng.expovariate(2000.0 if debug else 200.0)
        if now >= next_stats:
            emit(_stats(now, len(conns), seq, total, rng))
            next_stats += 10.0
        roll = rng.random()
        if not conns or roll < 0.02:
            who = rng.choice(clients) if rng.random() < 0.8 else (None, None)
            conn = _Conn(rng, lines, *who)
            conn.opened = now
            conns.append(conn)
            ctx = conn.ctx
            emit(line(now, "info", "connection open", "websockets.server", **ctx))
            emit(line(now, "info", "conn.opened", clients=len(conns), user_agent="wstally", **ctx))
            if "client" in ctx:
                emit(line(now, "info", "conn.hello", **ctx, since=None))
        elif roll < 0.035 and len(conns) > 1:
            _close(conns.pop(rng.randrange(len(conns))), now, len(conns), rng, emit)
        elif roll < 0.04:
            conn = rng.choice(conns)
            conn.refused += 1
            conn.messages += 1
            code, text = rng.choice(
                [("bad_number", "five"), ("bad_json", "{oops"), ("bad_delta", "1e99")]
            )
            emit(line(now, "info", "update.refused", **conn.ctx, code=code, id=None, input=text))
        elif roll < 0.041:
            emit("this is not JSON at all\n")
        else:
            conn = rng.choice(conns)
            conn.applied += 1
            conn.messages += 1
            delta = rng.randint(-50, 100)
            seq += 1
            total += delta
            if debug:
                fields: dict[str, Any] = {"seq": seq, "delta": delta, "total": total}
                emit(line(now, "debug", "update.applied", **conn.ctx, **fields, id=f"r{seq}"))
                if seq % 20 == 0:
                    batch: dict[str, Any] = {"batch": 20, "ms": round(rng.uniform(0.3, 4.0), 3)}
                    extra: dict[str, Any] = {"first_seq": seq - 19, "last_seq": seq, "pending": 0}
                    emit(
                        line(now, "debug", "store.committed", "wstally.committer", **batch, **extra)
                    )
    for conn in conns:
        _close(conn, now, 0, rng, emit)
    return lines


def _stats(now: float, connections: int, seq: int, total: int, rng: random.Random) -> str:
    return line(
        now,
        "info",
        "server.stats",
        "wstally.stats",
        interval=10.0,
        connections=connections,
        updates=rng.randint(100, 2000),
        updates_per_s=150.0,
        commits=50,
        batch_max=rng.randint(1, 40),
        commit_max_ms=round(rng.uniform(0.5, 30.0), 3),
        seq=seq,
        total=total,
        rss_kib=40000,
    )


def _close(conn: _Conn, now: float, left: int, rng: random.Random, emit: Any) -> None:
    code = rng.choice([1000, 1000, 1000, 1001, 1006])
    emit(line(now, "info", "connection closed", "websockets.server", **conn.ctx))
    emit(
        line(
            now,
            "info",
            "conn.closed",
            **conn.ctx,
            duration=round(now - conn.opened, 3),
            code=code,
            reason="",
            messages_in=conn.messages,
            bytes_in=conn.messages * 40,
            frames_out=conn.messages + 3,
            bytes_out=conn.messages * 90,
            applied=conn.applied,
            duplicates=0,
            refused=conn.refused,
            lagged=0,
            clients=left,
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--mb", type=float, default=200.0)
    parser.add_argument("--info", action="store_true", help="no debug (per-update) events")
    args = parser.parse_args()
    with open(args.out, "w", encoding="utf-8") as out:
        count = generate(out, int(args.mb * 1e6), debug=not args.info)
    print(f"{count} lines", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
