"""Arguments and entry points of ``wstally client`` and ``wstally watch``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

__all__ = ["add_parsers", "run"]

DEFAULT_URL = os.environ.get("WSTALLY_URL", "ws://127.0.0.1:8765")


def add_parsers(commands: Any) -> None:
    client = commands.add_parser(
        "client",
        help="add numbers and watch the total (interactive on a terminal, else piped)",
        description="On a terminal: type numbers while everyone's updates stream in. "
        "Piped: send one number per line, wait until all are acknowledged, print the total.",
    )
    client.add_argument("url", nargs="?", default=DEFAULT_URL, help="server [default %(default)s]")
    client.add_argument("--name", help="display name shown to others (≤ 32 printable chars)")
    client.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECS",
        help="piped mode: give up when the server is unreachable this long [default %(default)s]",
    )
    watch = commands.add_parser("watch", help="a read-only live view of the total")
    watch.add_argument("url", nargs="?", default=DEFAULT_URL, help="server [default %(default)s]")
    for parser in (client, watch):
        parser.add_argument(
            "--cafile", metavar="PEM", help="trust this CA for wss:// (default: system CAs)"
        )
        parser.add_argument(
            "--token",
            default=os.environ.get("WSTALLY_TOKEN"),
            help="access token, sent as Authorization: Bearer [env WSTALLY_TOKEN]",
        )
    watch.add_argument("--json", action="store_true", help="one JSON object per update")
    watch.add_argument("--exit-after", type=int, metavar="N", help="exit after N updates")


def run(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {"url": args.url, "cafile": args.cafile, "token": args.token}
    try:
        if args.command == "watch":
            from wstally.client.watch import run_watch

            tty = sys.stdout.isatty() and not args.json
            return asyncio.run(run_watch(options, args.json, args.exit_after, tty))
        options["name"] = args.name
        if sys.stdin.isatty():
            from wstally.client.prompt import run_interactive

            return asyncio.run(run_interactive(options))
        from wstally.client.piped import run_piped

        return asyncio.run(run_piped(options, args.timeout, sys.stdin))
    except KeyboardInterrupt:
        return 130
