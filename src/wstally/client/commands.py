"""Arguments and entry points of ``wstally client`` and ``wstally watch``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from wstally.options import env_argument, integer, number, ws_url
from wstally.protocol import escape_text

__all__ = ["DEFAULT_URL", "NAME_LIMIT", "add_parsers", "display_name", "run"]

DEFAULT_URL = "ws://127.0.0.1:8765/"
NAME_LIMIT = 32  # the server's limit for a hello name


def display_name(text: str) -> str:
    """An argparse ``type``: a name the server will show as given, not cut short."""
    # Control characters are sent escaped (the server refuses them): count them so.
    shown = escape_text(text, len(text))
    if not text or len(shown) > NAME_LIMIT:
        raise argparse.ArgumentTypeError(
            f"a name is 1 to {NAME_LIMIT} printable characters; {escape_text(text, 40)!r} "
            f"has {len(shown)}"
        )
    return text


def add_parsers(commands: Any) -> None:
    client = commands.add_parser(
        "client",
        help="add numbers and watch the total (interactive on a terminal, else piped)",
        description="On a terminal: type numbers while everyone's updates stream in. "
        "Piped: send one number per line, wait until all are acknowledged, print the total.",
    )
    client.add_argument(
        "--name", type=display_name, help=f"display name shown to others (≤ {NAME_LIMIT} chars)"
    )
    client.add_argument(
        "--timeout",
        type=number(0.0, above=True),
        default=10.0,
        metavar="SECS",
        help="piped mode: give up when the server is unreachable this long [default %(default)s]",
    )
    watch = commands.add_parser(
        "watch",
        help="a read-only live view of the total",
        description="On a terminal: a live view of the total, who changes it and how fast. "
        "Piped: one line (or JSON object) per update, in order.",
    )
    watch.add_argument("--json", action="store_true", help="one JSON object per update")
    watch.add_argument("--exit-after", type=integer(1), metavar="N", help="exit after N updates")
    for parser in (client, watch):
        _add_connection(parser)


def _add_connection(parser: argparse.ArgumentParser) -> None:
    env_argument(
        parser,
        "url",
        env="URL",
        default=DEFAULT_URL,
        nargs="?",
        type=ws_url,
        help="server: ws://HOST:PORT/ or wss://HOST:PORT/ (a bare HOST:PORT means ws://)",
    )
    parser.add_argument(
        "--cafile", metavar="PEM", help="trust this CA for wss:// (default: system CAs)"
    )
    env_argument(
        parser,
        "--token",
        env="TOKEN",
        default=None,
        help="access token, sent as Authorization: Bearer",
    )


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 done; 1 adds refused or unacknowledged; 2 no server; 130 Ctrl-C."""
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
