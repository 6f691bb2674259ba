"""The ``wstally`` command line: argument parsing only; each command's work lives elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from wstally import __version__, logsetup
from wstally.client import commands as client_commands

__all__ = ["main"]


def _env(name: str, default: str) -> str:
    return os.environ.get(f"WSTALLY_{name}", default)


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
        default=int(_env("PORT", "8765")),
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
        default=int(_env("BUFFER_LIMIT", str(256 * 1024))),
        metavar="BYTES",
        help="write buffer above which a client is skipped and later resynced "
        "[env WSTALLY_BUFFER_LIMIT; default %(default)s]",
    )
    serve.add_argument(
        "--flush-interval",
        type=float,
        default=float(_env("FLUSH_INTERVAL", "2")),
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
    _add_logging(serve)
    client_commands.add_parsers(commands)
    return parser


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

    config = ServerConfig(
        host=args.host,
        port=args.port,
        db=args.db,
        memory=args.memory,
        compression=args.compression,
        buffer_limit=args.buffer_limit,
        flush_interval=args.flush_interval / 1000,
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
    raise AssertionError(f"unhandled command {args.command}")
