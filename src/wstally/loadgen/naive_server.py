"""The textbook server, as a yardstick: one JSON broadcast() per update, default settings.

It speaks just enough of wstally.v1 for scripts/loadtest.py (snapshot, add, ack, updates,
/healthz), keeps the total in memory and stores nothing. ``--fault`` breaks it on purpose,
so the load test can show that its verdict is honest.

It lives in the package, so that ``loadtest.py --compare naive`` works wherever wstally is
installed: ``python -m wstally.loadgen.naive_server [--port P] [--fault drop|double]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import sys
from collections.abc import Sequence
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

__all__ = ["COMMAND", "main"]

# How the load test starts it: by module name, never by a path into a source checkout.
COMMAND = [sys.executable, "-m", "wstally.loadgen.naive_server"]

state = {"seq": 0, "total": 0}


def dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


EPOCH = secrets.token_hex(8)
clients: set[ServerConnection] = set()


async def handler(ws: ServerConnection, fault: str | None) -> None:
    clients.add(ws)
    snapshot = {"type": "snapshot", "epoch": EPOCH, **state, "clients": len(clients)}
    await ws.send(dumps(snapshot))
    try:
        async for message in ws:
            add = json.loads(message)
            if add.get("type") != "add":
                continue  # hello: the naive server has no use for it
            state["seq"] += 1
            seq = state["seq"]
            delta = add["delta"] * (2 if fault == "double" and seq == 100 else 1)
            state["total"] += delta
            total = state["total"]
            await ws.send(dumps({"type": "ack", "id": add.get("id"), "seq": seq, "total": total}))
            if fault == "drop" and seq == 100:
                continue  # the update is applied and acked, but nobody hears of it
            item = {"seq": seq, "delta": add["delta"], "total": total, "by": None}
            update = {"type": "updates", "seq": seq, "total": total, "items": [item]}
            broadcast(clients, dumps(update))
    finally:
        clients.discard(ws)


def health(ws: ServerConnection, request: Request) -> Response | None:
    if request.path == "/healthz":
        response = ws.respond(HTTPStatus.OK, dumps({"status": "ok", **state, "epoch": EPOCH}))
        return response
    return None


async def _serve(args: argparse.Namespace) -> None:
    async with serve(
        lambda ws: handler(ws, args.fault),
        args.host,
        args.port,
        subprotocols=["wstally.v1"],  # type: ignore[list-item]
        process_request=health,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        print(dumps({"event": "server.started", "port": port}), flush=True)
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="naive_server", description="The textbook server, as a yardstick."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--fault", choices=("drop", "double"), help="break seq 100 on purpose")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how it is stopped
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
