"""``wstally history``: its flags, and the checks between them before the history is read."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from wstally.cli.flags import add_flags, flag
from wstally.cli.ranges import BYTES
from wstally.options import redis_prefix, redis_url

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    history = commands.add_parser(
        "history",
        help="the audit trail: stored updates, and --verify",
        description="Print the updates stored in the SQLite database or kept in Redis "
        "(read-only; works while the server runs), or verify that their seqs and totals form "
        "an unbroken chain. On a terminal, a table under a header line; piped, one "
        "tab-separated line per update without a header: seq, time, delta, total, client, "
        "name, conn, request id (- for none); --json names every field.",
    )
    add_flags(
        history,
        flag("--db", "wstally.db", "SQLite database file", metavar="PATH"),
        flag(
            "--redis",
            None,
            "read the history the nodes share in this Redis instead (the last 100,000 "
            "updates; nothing is written)",
            type=redis_url,
            metavar="URL",
        ),
        group=history.add_mutually_exclusive_group(),
    )
    add_flags(
        history,
        flag(
            "--redis-prefix",
            "wstally",
            "key prefix in Redis, as given to serve",
            type=redis_prefix,
            metavar="NAME",
        ),
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


def run(args: argparse.Namespace, from_env: set[str]) -> int:
    """Check the flags together, then print or verify.

    ``from_env``: the flags not given on the command line (``options.apply_env``).
    """
    from wstally import history

    if args.verify and (args.client is not None or args.tail is not None):
        print("wstally history: error: --verify checks the whole chain", file=sys.stderr)
        return 2
    if "redis" in from_env and "db" not in from_env:
        args.redis = None  # --db given beats a WSTALLY_REDIS meant for the servers
    return history.run(args)
