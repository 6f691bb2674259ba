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
from wstally.cli.ranges import BYTES, COUNT, LIMIT, PORT, SECONDS
from wstally.config import DEFAULTS
from wstally.options import env_argument, number, redis_prefix, redis_url

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
    env_argument(parser, "--host", env="HOST", default=DEFAULTS.host, help="address to listen on")
    env_argument(
        parser,
        "--port",
        env="PORT",
        default=DEFAULTS.port,
        type=PORT,
        help="port to listen on (0-65535), 0 for any free one",
    )


def _add_storage(parser: argparse.ArgumentParser) -> None:
    """Where the data lives: a SQLite file, memory, or a Redis shared by several nodes."""
    where = parser.add_mutually_exclusive_group()
    env_argument(
        parser,
        "--db",
        group=where,
        env="DB",
        default=DEFAULTS.db,
        metavar="PATH",
        help="SQLite database file",
    )
    env_argument(
        parser,
        "--memory",
        group=where,
        env="MEMORY",
        default=False,
        shown="off",
        action="store_true",
        help="keep everything in memory; nothing survives a restart",
    )
    env_argument(
        parser,
        "--redis",
        group=where,
        env="REDIS",
        default=None,
        type=redis_url,
        metavar="URL",
        help="share one total with every node on this Redis (redis://HOST:PORT/DB, "
        "rediss:// for TLS, unix:///path.sock); see README, Several nodes",
    )
    env_argument(
        parser,
        "--redis-prefix",
        env="REDIS_PREFIX",
        default=DEFAULTS.redis_prefix,
        type=redis_prefix,
        metavar="NAME",
        help="key prefix in Redis, so that several tallies can share one Redis",
    )
    env_argument(
        parser,
        "--node",
        env="NODE",
        default=None,
        type=redis_prefix,
        metavar="NAME",
        help="this node's name in Redis and /healthz (default: HOST:PID)",
    )


def _add_serving(parser: argparse.ArgumentParser) -> None:
    """How it serves: metrics, a shared port, compression, broadcast pacing, the event loop."""
    env_argument(
        parser,
        "--no-metrics",
        env="NO_METRICS",
        default=False,
        shown="off",
        action="store_true",
        help="do not serve GET /metrics (nor time each ack for it)",
    )
    env_argument(
        parser,
        "--reuse-port",
        env="REUSE_PORT",
        default=False,
        shown="off",
        action="store_true",
        help="let several processes serve one port on this machine (SO_REUSEPORT)",
    )
    env_argument(
        parser,
        "--compression",
        env="COMPRESSION",
        default=False,
        shown="off",
        action="store_true",
        help="offer permessage-deflate (costs CPU and memory per client)",
    )
    env_argument(
        parser,
        "--buffer-limit",
        env="BUFFER_LIMIT",
        default=DEFAULTS.buffer_limit,
        type=BYTES,
        metavar="BYTES",
        help="write buffer above which a client is skipped and later resynced",
    )
    env_argument(
        parser,
        "--flush-interval",
        env="FLUSH_INTERVAL",
        default=DEFAULTS.flush_interval * 1000,  # shown in ms
        type=number(0.0, 1000.0),
        metavar="MS",
        help="least time between two broadcast writes to a client (0-1000); under load, "
        "updates within it share one frame",
    )
    env_argument(
        parser,
        "--loop",
        env="LOOP",
        default="auto",
        choices=("auto", "asyncio", "uvloop"),
        help="event loop: uvloop when installed (auto), or force one",
    )


def _add_access(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("access")
    secret = group.add_mutually_exclusive_group()
    env_argument(
        parser,
        "--token",
        group=secret,
        env="TOKEN",
        default=None,
        help="require this secret from clients (Authorization: Bearer, or ?token=); "
        "prefer --token-file or the env var, which stay out of process listings",
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
    _add_load_limits(parser, group)
    _add_timeouts(parser, group)


def _add_load_limits(parser: argparse.ArgumentParser, group: Any) -> None:
    """How many clients, frames and adds; past a limit a client is refused or closed."""
    env_argument(
        parser,
        "--max-connections",
        group=group,
        env="MAX_CONNECTIONS",
        default=DEFAULTS.max_connections,
        type=COUNT,
        metavar="N",
        help="refuse handshakes beyond N clients with HTTP 503",
    )
    env_argument(
        parser,
        "--frame-limit",
        group=group,
        env="FRAME_LIMIT",
        default=DEFAULTS.frame_limit,
        type=LIMIT,
        metavar="N",
        help="frames per second per connection, every kind (pings too); past it the "
        "connection is closed with 1008; 0 disables",
    )
    env_argument(
        parser,
        "--invalid-limit",
        group=group,
        env="INVALID_LIMIT",
        default=DEFAULTS.invalid_limit,
        type=LIMIT,
        metavar="N",
        help="malformed frames per second per connection; past it: closed with 1008; 0 disables",
    )
    env_argument(
        parser,
        "--rate-limit",
        group=group,
        env="RATE_LIMIT",
        default=DEFAULTS.rate_limit,
        type=SECONDS,
        metavar="ADDS",
        help="adds per second per connection (token bucket, a second's worth of burst); 0 disables",
    )


def _add_timeouts(parser: argparse.ArgumentParser, group: Any) -> None:
    """When a slow or silent client is dropped."""
    env_argument(
        parser,
        "--slow-timeout",
        group=group,
        env="SLOW_TIMEOUT",
        default=DEFAULTS.slow_timeout,
        type=SECONDS,
        metavar="SECS",
        help="close a client whose write buffer stays over --buffer-limit this long (code 4008)",
    )
    env_argument(
        parser,
        "--ping-interval",
        group=group,
        env="PING_INTERVAL",
        default=DEFAULTS.ping_interval,
        type=SECONDS,
        metavar="SECS",
        help="keepalive ping period, 0 for none",
    )
    env_argument(
        parser,
        "--ping-timeout",
        group=group,
        env="PING_TIMEOUT",
        default=DEFAULTS.ping_timeout,
        type=SECONDS,
        metavar="SECS",
        help="drop a peer that does not answer a ping within SECS, 0 for never",
    )


def _add_reporting(parser: argparse.ArgumentParser) -> None:
    """What it tells: server.stats every so often, and the log's format, level and file."""
    env_argument(
        parser,
        "--stats-interval",
        env="STATS_INTERVAL",
        default=DEFAULTS.stats_interval,
        type=SECONDS,
        metavar="SECS",
        help="log server.stats every SECS seconds, 0 for never",
    )
    group = parser.add_argument_group("logging")
    env_argument(
        parser,
        "--log-format",
        group=group,
        env="LOG_FORMAT",
        default="auto",
        choices=logsetup.FORMATS,
        help="console on a terminal and JSON lines otherwise (auto), or force one",
    )
    env_argument(
        parser,
        "--log-level",
        group=group,
        env="LOG_LEVEL",
        default="info",
        choices=logsetup.LEVELS,
        help="minimum level",
    )
    env_argument(
        parser,
        "--log-file",
        group=group,
        env="LOG_FILE",
        default=None,
        metavar="PATH",
        help="also append JSON lines to PATH",
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
    from wstally.server import ServerConfig, StartupError
    from wstally.server import run as run_server
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
