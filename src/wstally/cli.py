"""The ``wstally`` command line: argument parsing only; each command's work lives elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from wstally import __version__, logsetup
from wstally.client import commands as client_commands
from wstally.config import DEFAULTS
from wstally.options import apply_env, env_argument, integer, number, redis_prefix, redis_url

__all__ = ["main"]


# Ranges of the server's numbers: a value outside is a usage error naming the range.
PORT = integer(0, 65535)
COUNT = integer(1)
LIMIT = integer(0)  # 0 disables
BYTES = integer(0)
SECONDS = number(0.0)


def _add_logging(parser: argparse.ArgumentParser) -> None:
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


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="wstally",
        description="A shared running total over WebSockets.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"wstally {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    client_commands.add_parsers(commands)
    _add_logs(commands)
    _add_history(commands)
    return parser, commands.choices


EXIT_CODES = """exit status (every command):
  0    done, nothing lost (serve: stopped by SIGINT or SIGTERM after draining)
  1    it ran, and something failed: an add refused or never acknowledged, a failed
       check (history --verify), a server that could not start or had to be forced
  2    nothing was done: a usage error (flag, argument, URL, WSTALLY_* value), or the
       server, database or file it needs could not be reached or read
  130  interrupted by Ctrl-C (serve excepted: SIGINT stops it gracefully)"""


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the tally server",
        description="Keep one shared running total: apply every client's adds in order, "
        "store them durably, acknowledge them and broadcast every update to every client.",
    )
    env_argument(serve, "--host", env="HOST", default=DEFAULTS.host, help="address to listen on")
    env_argument(
        serve,
        "--port",
        env="PORT",
        default=DEFAULTS.port,
        type=PORT,
        help="port to listen on (0-65535), 0 for any free one",
    )
    where = serve.add_mutually_exclusive_group()
    env_argument(
        serve,
        "--db",
        group=where,
        env="DB",
        default=DEFAULTS.db,
        metavar="PATH",
        help="SQLite database file",
    )
    env_argument(
        serve,
        "--memory",
        group=where,
        env="MEMORY",
        default=False,
        shown="off",
        action="store_true",
        help="keep everything in memory; nothing survives a restart",
    )
    env_argument(
        serve,
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
        serve,
        "--redis-prefix",
        env="REDIS_PREFIX",
        default=DEFAULTS.redis_prefix,
        type=redis_prefix,
        metavar="NAME",
        help="key prefix in Redis, so that several tallies can share one Redis",
    )
    env_argument(
        serve,
        "--node",
        env="NODE",
        default=None,
        type=redis_prefix,
        metavar="NAME",
        help="this node's name in Redis and /healthz (default: HOST:PID)",
    )
    env_argument(
        serve,
        "--no-metrics",
        env="NO_METRICS",
        default=False,
        shown="off",
        action="store_true",
        help="do not serve GET /metrics (nor time each ack for it)",
    )
    env_argument(
        serve,
        "--reuse-port",
        env="REUSE_PORT",
        default=False,
        shown="off",
        action="store_true",
        help="let several processes serve one port on this machine (SO_REUSEPORT)",
    )
    env_argument(
        serve,
        "--compression",
        env="COMPRESSION",
        default=False,
        shown="off",
        action="store_true",
        help="offer permessage-deflate (costs CPU and memory per client)",
    )
    env_argument(
        serve,
        "--buffer-limit",
        env="BUFFER_LIMIT",
        default=DEFAULTS.buffer_limit,
        type=BYTES,
        metavar="BYTES",
        help="write buffer above which a client is skipped and later resynced",
    )
    env_argument(
        serve,
        "--flush-interval",
        env="FLUSH_INTERVAL",
        default=DEFAULTS.flush_interval * 1000,  # shown in ms
        type=number(0.0, 1000.0),
        metavar="MS",
        help="least time between two broadcast writes to a client (0-1000); under load, "
        "updates within it share one frame",
    )
    env_argument(
        serve,
        "--loop",
        env="LOOP",
        default="auto",
        choices=("auto", "asyncio", "uvloop"),
        help="event loop: uvloop when installed (auto), or force one",
    )
    _add_access(serve)
    _add_limits(serve)
    env_argument(
        serve,
        "--stats-interval",
        env="STATS_INTERVAL",
        default=DEFAULTS.stats_interval,
        type=SECONDS,
        metavar="SECS",
        help="log server.stats every SECS seconds, 0 for never",
    )
    _add_logging(serve)


def _add_logs(commands: Any) -> None:
    logs = commands.add_parser(
        "logs",
        help="filter, follow and summarize wstally's JSON log lines",
        description="Read JSON log lines (as written by --log-file, or by serve when its "
        "stderr is not a terminal) from FILEs or piped stdin; print the matching events, "
        "readable on a terminal, or pass them through unchanged (--json), or summarize them. "
        "Nothing matched is said on stderr, with exit status 0.",
        epilog=LOGS_EVENTS,
        formatter_class=_KeepLines,
    )
    logs.add_argument(
        "files", nargs="*", metavar="FILE", help="log files; '-': stdin (none: piped stdin)"
    )
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
    logs.add_argument(
        "--top", type=COUNT, default=5, metavar="N", help="rows in top-N tables [default 5]"
    )
    logs.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep reading as files grow, across rotation and truncation (like tail -F); "
        "starts at the end unless --since is given",
    )
    logs.add_argument(
        "--poll-interval",
        type=number(0.0, above=True),
        default=0.25,
        metavar="SECS",
        help=argparse.SUPPRESS,
    )


class _KeepLines(argparse.HelpFormatter):
    """Wraps a one-paragraph description; keeps text laid out in lines (a table) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


LOGS_EVENTS = """events most worth a filter (--summary FILE counts every event a log holds):
  conn.closed        one line per connection at its end: duration, code, reason,
                     messages_in, applied, refused, lagged
  conn.opened, conn.hello
                     a connection, then its client id and name (JSON mode)
  update.refused     a refused message: code, input
  broadcast.lagging, conn.resynced, conn.evicted
                     a slow consumer skipped, caught up, closed (4008)
  server.stats       figures every --stats-interval: updates_per_s, connections...
  server.started, server.stopped, server.failed
  store.commit_slow, store.commit_failed, engine.disconnected
                     the store or Redis in trouble
  http.response, http.rejected
                     refused handshakes and plain HTTP answers: status, reason
  update.applied     every add, with its delta (only with serve --log-level debug)

examples:
  wstally logs --summary server.log
  wstally logs --event conn.closed --where 'code!=1000' server.log
  wstally logs -f --level warning server.log"""


def _add_history(commands: Any) -> None:
    history = commands.add_parser(
        "history",
        help="the audit trail: stored updates, and --verify",
        description="Print the updates stored in the SQLite database or kept in Redis "
        "(read-only; works while the server runs), or verify that their seqs and totals form "
        "an unbroken chain. On a terminal, a table under a header line; piped, one "
        "tab-separated line per update without a header: seq, time, delta, total, client, "
        "name, conn, request id (- for none); --json names every field.",
    )
    where = history.add_mutually_exclusive_group()
    env_argument(
        history,
        "--db",
        group=where,
        env="DB",
        default="wstally.db",
        metavar="PATH",
        help="SQLite database file",
    )
    env_argument(
        history,
        "--redis",
        group=where,
        env="REDIS",
        default=None,
        type=redis_url,
        metavar="URL",
        help="read the history the nodes share in this Redis instead (the last 100,000 "
        "updates; nothing is written)",
    )
    env_argument(
        history,
        "--redis-prefix",
        env="REDIS_PREFIX",
        default="wstally",
        type=redis_prefix,
        metavar="NAME",
        help="key prefix in Redis, as given to serve",
    )
    history.add_argument("--since", type=BYTES, default=0, metavar="SEQ", help="rows after SEQ")
    history.add_argument("--client", metavar="C", help="rows of this hello client id or name")
    history.add_argument("--tail", type=BYTES, metavar="N", help="only the last N rows")
    history.add_argument("--json", action="store_true", help="one JSON object per row")
    history.add_argument(
        "--verify",
        action="store_true",
        help="check the seq chain and re-derive every total; exit 1 at the first inconsistency",
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
        return _runner(args.loop)(run(config))
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


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = _parser()
    args = parser.parse_args(argv)
    from_env = apply_env(args, commands[args.command])
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
        from wstally import logs

        return logs.run(args)
    if args.command == "history":
        from wstally import history

        if args.verify and (args.client is not None or args.tail is not None):
            print("wstally history: error: --verify checks the whole chain", file=sys.stderr)
            return 2
        if "redis" in from_env and "db" not in from_env:
            args.redis = None  # --db given beats a WSTALLY_REDIS meant for the servers
        return history.run(args)
    raise AssertionError(f"unhandled command {args.command}")
