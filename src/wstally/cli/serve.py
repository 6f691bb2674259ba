"""``wstally serve``: its flags, grouped by what they set, and the server's start.

The flags are added in the order ``--help`` lists them: where it listens, where the data
lives, how it serves, then the access, limits and logging groups.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from wstally import logsetup
from wstally.cli.flags import add_flags, flag, switch
from wstally.cli.ranges import BYTES, COUNT, LIMIT, PORT, SECONDS
from wstally.config import DEFAULTS
from wstally.options import number, redis_prefix, redis_url

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the tally server",
        description="Keep one shared running total: apply every client's adds in order, "
        "store them durably, acknowledge them and broadcast every update to every client.",
    )
    _add_listening(serve)
    _add_storage(serve)
    _add_serving(serve)
    _add_access(serve)
    _add_limits(serve)
    _add_reporting(serve)


def _add_listening(parser: argparse.ArgumentParser) -> None:
    """Where it listens."""
    add_flags(
        parser,
        flag("--host", DEFAULTS.host, "address to listen on"),
        flag("--port", DEFAULTS.port, "port to listen on (0-65535), 0 for any free one", type=PORT),
    )


def _add_storage(parser: argparse.ArgumentParser) -> None:
    """Where the data lives: a SQLite file, memory, or a Redis shared by several nodes."""
    add_flags(
        parser,
        flag("--db", DEFAULTS.db, "SQLite database file", metavar="PATH"),
        switch("--memory", "keep everything in memory; nothing survives a restart"),
        flag(
            "--redis",
            None,
            "share one total with every node on this Redis (redis://HOST:PORT/DB, "
            "rediss:// for TLS, unix:///path.sock); see README, Several nodes",
            type=redis_url,
            metavar="URL",
        ),
        group=parser.add_mutually_exclusive_group(),
    )
    add_flags(
        parser,
        flag(
            "--redis-prefix",
            DEFAULTS.redis_prefix,
            "key prefix in Redis, so that several tallies can share one Redis",
            type=redis_prefix,
            metavar="NAME",
        ),
        flag(
            "--node",
            None,
            "this node's name in Redis and /healthz (default: HOST:PID)",
            type=redis_prefix,
            metavar="NAME",
        ),
    )


def _add_serving(parser: argparse.ArgumentParser) -> None:
    """How it serves: metrics, a shared port, compression, broadcast pacing, the event loop."""
    add_flags(
        parser,
        switch("--no-metrics", "do not serve GET /metrics (nor time each ack for it)"),
        switch(
            "--reuse-port", "let several processes serve one port on this machine (SO_REUSEPORT)"
        ),
        switch("--compression", "offer permessage-deflate (costs CPU and memory per client)"),
        flag(
            "--buffer-limit",
            DEFAULTS.buffer_limit,
            "write buffer above which a client is skipped and later resynced",
            type=BYTES,
            metavar="BYTES",
        ),
        flag(
            "--flush-interval",
            DEFAULTS.flush_interval * 1000,  # shown in ms
            "least time between two broadcast writes to a client (0-1000); under load, "
            "updates within it share one frame",
            type=number(0.0, 1000.0),
            metavar="MS",
        ),
        flag(
            "--loop",
            "auto",
            "event loop: uvloop when installed (auto), or force one",
            choices=("auto", "asyncio", "uvloop"),
        ),
    )


def _add_access(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("access")
    secret = group.add_mutually_exclusive_group()
    add_flags(
        parser,
        flag(
            "--token",
            None,
            "require this secret from clients (Authorization: Bearer, or ?token=); "
            "prefer --token-file or the env var, which stay out of process listings",
        ),
        group=secret,
    )
    secret.add_argument("--token-file", metavar="PATH", help="read the token from PATH")
    group.add_argument(
        "--allow-origin",
        action="append",
        metavar="ORIGIN",
        help="browser origin allowed to connect, e.g. https://tally.example (repeatable; "
        "default: any) [env WSTALLY_ALLOW_ORIGINS, comma-separated]",
    )
    group.add_argument("--certfile", metavar="PEM", help="serve wss:// with this certificate")
    group.add_argument("--keyfile", metavar="PEM", help="its private key (if not in --certfile)")


def _add_limits(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits")
    add_flags(parser, *_LOAD_LIMITS, *_TIMEOUTS, group=group)


# How many clients, frames and adds; past a limit a client is refused or closed.
_LOAD_LIMITS = (
    flag(
        "--max-connections",
        DEFAULTS.max_connections,
        "refuse handshakes beyond N clients with HTTP 503",
        type=COUNT,
        metavar="N",
    ),
    flag(
        "--frame-limit",
        DEFAULTS.frame_limit,
        "frames per second per connection, every kind (pings too); past it the "
        "connection is closed with 1008; 0 disables",
        type=LIMIT,
        metavar="N",
    ),
    flag(
        "--invalid-limit",
        DEFAULTS.invalid_limit,
        "malformed frames per second per connection; past it: closed with 1008; 0 disables",
        type=LIMIT,
        metavar="N",
    ),
    flag(
        "--flood-ban",
        DEFAULTS.flood_ban,
        "seconds an address closed for flooding is refused new connections (429), "
        "doubling at each repeat up to a minute; 0 disables (do so behind a proxy, where "
        "every client has the proxy's address)",
        type=SECONDS,
        metavar="SECS",
    ),
    flag(
        "--rate-limit",
        DEFAULTS.rate_limit,
        "adds per second per connection (token bucket, a second's worth of burst); 0 disables",
        type=SECONDS,
        metavar="ADDS",
    ),
)

# When a slow or silent client is dropped.
_TIMEOUTS = (
    flag(
        "--slow-timeout",
        DEFAULTS.slow_timeout,
        "close a client whose write buffer stays over --buffer-limit this long (code 4008)",
        type=SECONDS,
        metavar="SECS",
    ),
    flag(
        "--ping-interval",
        DEFAULTS.ping_interval,
        "keepalive ping period, 0 for none",
        type=SECONDS,
        metavar="SECS",
    ),
    flag(
        "--ping-timeout",
        DEFAULTS.ping_timeout,
        "drop a peer that does not answer a ping within SECS, 0 for never",
        type=SECONDS,
        metavar="SECS",
    ),
)


def _add_reporting(parser: argparse.ArgumentParser) -> None:
    """What it tells: server.stats every so often, and the log's format, level and file."""
    add_flags(
        parser,
        flag(
            "--stats-interval",
            DEFAULTS.stats_interval,
            "log server.stats every SECS seconds, 0 for never",
            type=SECONDS,
            metavar="SECS",
        ),
    )
    add_flags(
        parser,
        flag(
            "--log-format",
            "auto",
            "console on a terminal and JSON lines otherwise (auto), or force one",
            choices=logsetup.FORMATS,
        ),
        flag("--log-level", "info", "minimum level", choices=logsetup.LEVELS),
        flag("--log-file", None, "also append JSON lines to PATH", metavar="PATH"),
        group=parser.add_argument_group("logging"),
    )


def _runner(choice: str) -> Callable[[Coroutine[Any, Any, int]], int]:
    """asyncio.run, or uvloop.run: uvloop cuts the per-message CPU cost noticeably."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("wstally: error: --loop uvloop: uvloop is not installed") from None
        else:
            return uvloop.run
    return asyncio.run


def run(args: argparse.Namespace) -> int:
    """Start the server the flags describe; its exit status."""
    from wstally.process import run as run_server
    from wstally.server import ServerConfig, StartupError
    from wstally.store import StoreError

    token = args.token
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            print(f"wstally serve: error: cannot read the token file: {exc}", file=sys.stderr)
            return 1
    config = ServerConfig(
        host=args.host,
        port=args.port,
        db=args.db,
        memory=args.memory,
        compression=args.compression,
        buffer_limit=args.buffer_limit,
        flush_interval=args.flush_interval / 1000,
        stats_interval=args.stats_interval,
        token=token,
        allow_origins=args.allow_origin or _env_origins() or None,
        certfile=args.certfile,
        keyfile=args.keyfile,
        max_connections=args.max_connections,
        rate_limit=args.rate_limit,
        slow_timeout=args.slow_timeout,
        ping_interval=args.ping_interval or None,
        ping_timeout=args.ping_timeout or None,
        redis=args.redis,
        redis_prefix=args.redis_prefix,
        node=args.node,
        reuse_port=args.reuse_port,
        metrics=not args.no_metrics,
        frame_limit=args.frame_limit,
        invalid_limit=args.invalid_limit,
        flood_ban=args.flood_ban,
    )
    try:
        return _runner(args.loop)(run_server(config))
    except (StoreError, StartupError) as exc:
        # Logged already as server.failed (on stderr); said again only if errors are not
        # logged at all (--log-level critical): one message per failure.
        if not logsetup.enabled_for(logging.ERROR):
            print(f"wstally serve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 130


def _env_origins() -> list[str]:
    raw = os.environ.get("WSTALLY_ALLOW_ORIGINS", "")
    return [origin.strip() for origin in raw.split(",") if origin.strip()]
