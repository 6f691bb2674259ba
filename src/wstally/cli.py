"""The ``wstally`` command line: argument parsing only; each command's work lives elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from wstally import __version__, logsetup
from wstally.client import commands as client_commands

__all__ = ["main"]


def _env(name: str, default: str) -> str:
    return os.environ.get(f"WSTALLY_{name}", default)


def _env_int(name: str, default: int) -> int:
    return int(_env_number(name, default))


def _env_float(name: str, default: float) -> float:
    return float(_env_number(name, default))


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(f"WSTALLY_{name}")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"wstally: error: WSTALLY_{name}={raw!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise SystemExit(f"wstally: error: WSTALLY_{name}={raw!r} must be a finite number >= 0")
    return value


def _env_flag(name: str) -> bool:
    return os.environ.get(f"WSTALLY_{name}", "").lower() in {"1", "true", "yes", "on"}


def _add_logging(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument(
        "--log-format",
        choices=logsetup.FORMATS,
        default=_env("LOG_FORMAT", "auto"),
        help="console on a terminal and JSON lines otherwise (auto), or force one "
        "[env WSTALLY_LOG_FORMAT; default %(default)s]",
    )
    group.add_argument(
        "--log-level",
        choices=logsetup.LEVELS,
        default=_env("LOG_LEVEL", "info"),
        help="minimum level [env WSTALLY_LOG_LEVEL; default %(default)s]",
    )
    group.add_argument(
        "--log-file",
        default=os.environ.get("WSTALLY_LOG_FILE"),
        metavar="PATH",
        help="also append JSON lines to PATH [env WSTALLY_LOG_FILE]",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wstally",
        description="A shared running total over WebSockets.",
    )
    parser.add_argument("--version", action="version", version=f"wstally {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the tally server")
    serve.add_argument(
        "--host",
        default=_env("HOST", "127.0.0.1"),
        help="address to listen on [env WSTALLY_HOST; default %(default)s]",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=_env_int("PORT", 8765),
        help="port to listen on, 0 for any free one [env WSTALLY_PORT; default %(default)s]",
    )
    where = serve.add_mutually_exclusive_group()
    where.add_argument(
        "--db",
        default=_env("DB", "wstally.db"),
        metavar="PATH",
        help="SQLite database file [env WSTALLY_DB; default %(default)s]",
    )
    where.add_argument(
        "--memory",
        action="store_true",
        default=_env_flag("MEMORY"),
        help="keep everything in memory; nothing survives a restart [env WSTALLY_MEMORY]",
    )
    serve.add_argument(
        "--compression",
        action="store_true",
        default=_env_flag("COMPRESSION"),
        help="offer permessage-deflate (costs CPU and memory per client) [env WSTALLY_COMPRESSION]",
    )
    serve.add_argument(
        "--buffer-limit",
        type=int,
        default=_env_int("BUFFER_LIMIT", 256 * 1024),
        metavar="BYTES",
        help="write buffer above which a client is skipped and later resynced "
        "[env WSTALLY_BUFFER_LIMIT; default %(default)s]",
    )
    serve.add_argument(
        "--flush-interval",
        type=float,
        default=_env_float("FLUSH_INTERVAL", 2.0),
        metavar="MS",
        help="least time between two broadcast writes to a client; under load, updates "
        "within it share one frame [env WSTALLY_FLUSH_INTERVAL; default %(default)s]",
    )
    serve.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default=_env("LOOP", "auto"),
        help="event loop: uvloop when installed (auto), or force one "
        "[env WSTALLY_LOOP; default %(default)s]",
    )
    _add_access(serve)
    _add_limits(serve)
    serve.add_argument(
        "--stats-interval",
        type=float,
        default=float(_env("STATS_INTERVAL", "10")),
        metavar="SECS",
        help="log server.stats every SECS seconds, 0 for never "
        "[env WSTALLY_STATS_INTERVAL; default %(default)s]",
    )
    _add_logging(serve)
    client_commands.add_parsers(commands)
    _add_logs(commands)
    _add_history(commands)
    return parser


def _add_logs(commands: Any) -> None:
    logs = commands.add_parser(
        "logs",
        help="filter, follow and summarize wstally's JSON log lines",
        description="Read JSON log lines (as written by --log-file, or by serve when its "
        "stderr is not a terminal) from FILEs or stdin; print the matching events, readable "
        "on a terminal, or pass them through unchanged (--json), or summarize them. "
        "The event catalog is docs/logging.md.",
    )
    logs.add_argument("files", nargs="*", metavar="FILE", help="log files; '-' or none: stdin")
    pick = logs.add_argument_group("filters (all must match)")
    pick.add_argument(
        "--event", action="append", metavar="GLOB", help="event name or glob (repeatable: any)"
    )
    pick.add_argument("--level", metavar="LEVEL", help="minimum level: debug, info, warning...")
    pick.add_argument("--client", metavar="C", help="events of this hello client id or name")
    pick.add_argument("--conn", metavar="ID", help="events of this connection (id or prefix)")
    pick.add_argument("--since", metavar="WHEN", help="ISO time, or a duration ago: 30s, 10m, 2h")
    pick.add_argument("--until", metavar="WHEN", help="ISO time, or a duration ago")
    pick.add_argument(
        "--where",
        action="append",
        metavar="FIELD=VALUE",
        help="a field's value (also !=, >, >=, <, <= for numbers; repeatable: all)",
    )
    shape = logs.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="matching lines unchanged (for jq)")
    shape.add_argument("--summary", action="store_true", help="tables of counts, not events")
    logs.add_argument("--top", type=int, default=5, metavar="N", help="rows in top-N tables")
    logs.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep reading as files grow, across rotation and truncation (like tail -F); "
        "starts at the end unless --since is given",
    )
    logs.add_argument(
        "--poll-interval", type=float, default=0.25, metavar="SECS", help=argparse.SUPPRESS
    )


def _add_history(commands: Any) -> None:
    history = commands.add_parser(
        "history",
        help="the audit trail: stored updates, and --verify",
        description="Print the updates stored in the SQLite database (read-only; works "
        "while the server runs), or verify that their seqs and totals form an unbroken chain.",
    )
    history.add_argument(
        "--db",
        default=_env("DB", "wstally.db"),
        metavar="PATH",
        help="SQLite database file [env WSTALLY_DB; default %(default)s]",
    )
    history.add_argument("--since", type=int, default=0, metavar="SEQ", help="rows after SEQ")
    history.add_argument("--client", metavar="C", help="rows of this hello client id or name")
    history.add_argument("--tail", type=int, metavar="N", help="only the last N rows")
    history.add_argument("--json", action="store_true", help="one JSON object per row")
    history.add_argument(
        "--verify",
        action="store_true",
        help="check the seq chain and re-derive every total; exit 1 at the first inconsistency",
    )


def _add_access(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("access")
    secret = group.add_mutually_exclusive_group()
    secret.add_argument(
        "--token",
        default=os.environ.get("WSTALLY_TOKEN"),
        help="require this secret from clients (Authorization: Bearer, or ?token=); "
        "prefer --token-file or the env var, which stay out of process listings "
        "[env WSTALLY_TOKEN]",
    )
    secret.add_argument("--token-file", metavar="PATH", help="read the token from PATH")
    group.add_argument(
        "--allow-origin",
        action="append",
        metavar="ORIGIN",
        default=[o for o in _env("ALLOW_ORIGINS", "").split(",") if o],
        help="browser origin allowed to connect, e.g. https://tally.example (repeatable; "
        "default: any) [env WSTALLY_ALLOW_ORIGINS, comma-separated]",
    )
    group.add_argument("--certfile", metavar="PEM", help="serve wss:// with this certificate")
    group.add_argument("--keyfile", metavar="PEM", help="its private key (if not in --certfile)")


def _add_limits(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits")
    group.add_argument(
        "--max-connections",
        type=int,
        default=_env_int("MAX_CONNECTIONS", 20_000),
        metavar="N",
        help="refuse handshakes beyond N clients with HTTP 503 [default %(default)s]",
    )
    group.add_argument(
        "--rate-limit",
        type=float,
        default=_env_float("RATE_LIMIT", 10_000.0),
        metavar="ADDS",
        help="adds per second per connection (token bucket, a second's worth of burst); "
        "0 disables [env WSTALLY_RATE_LIMIT; default %(default)s]",
    )
    group.add_argument(
        "--slow-timeout",
        type=float,
        default=_env_float("SLOW_TIMEOUT", 5.0),
        metavar="SECS",
        help="close a client whose write buffer stays over --buffer-limit this long "
        "(code 4008) [env WSTALLY_SLOW_TIMEOUT; default %(default)s]",
    )
    group.add_argument(
        "--ping-interval",
        type=float,
        default=_env_float("PING_INTERVAL", 20.0),
        metavar="SECS",
        help="keepalive ping period; a peer that does not answer within --ping-timeout is "
        "dropped [default %(default)s]",
    )
    group.add_argument(
        "--ping-timeout", type=float, default=_env_float("PING_TIMEOUT", 20.0), metavar="SECS"
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


def _serve(args: argparse.Namespace) -> int:
    from wstally.server import ServerConfig, StartupError, run
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
        allow_origins=args.allow_origin or None,
        certfile=args.certfile,
        keyfile=args.keyfile,
        max_connections=args.max_connections,
        rate_limit=args.rate_limit,
        slow_timeout=args.slow_timeout,
        ping_interval=args.ping_interval or None,
        ping_timeout=args.ping_timeout or None,
    )
    try:
        return _runner(args.loop)(run(config))
    except (StoreError, StartupError) as exc:
        print(f"wstally serve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        logsetup.configure(
            getattr(args, "log_format", "auto"),
            getattr(args, "log_level", "warning"),
            getattr(args, "log_file", None),
        )
    except OSError as exc:
        print(f"wstally: error: cannot open log file: {exc}", file=sys.stderr)
        return 1
    if args.command == "serve":
        return _serve(args)
    if args.command in ("client", "watch"):
        return client_commands.run(args)
    if args.command == "logs":
        from wstally import logview

        return logview.run(args)
    if args.command == "history":
        from wstally import history

        if args.verify and (args.client is not None or args.tail is not None):
            print("wstally history: error: --verify checks the whole chain", file=sys.stderr)
            return 2
        return history.run(args)
    raise AssertionError(f"unhandled command {args.command}")
