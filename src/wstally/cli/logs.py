"""``wstally logs``: its flags, and its help's list of the events most worth a filter."""

from __future__ import annotations

import argparse
from typing import Any

from wstally.cli.ranges import COUNT
from wstally.options import number

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
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


def run(args: argparse.Namespace) -> int:
    from wstally import logs

    return logs.run(args)
