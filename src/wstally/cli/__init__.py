"""The ``wstally`` command line: argument parsing only; each command's work lives elsewhere.

One module per command, each leaning only on those listed before it:

- ``ranges``: the ranges of the commands' numbers;
- ``flags``: flags backed by ``WSTALLY_*`` variables, declared as rows of a table;
- ``serve``: ``wstally serve``, its flags grouped by what they set, and its start;
- ``logs``: ``wstally logs``, its flags and its help's list of events;
- ``history``: ``wstally history``, its flags and their checks;
- this package: the parser of every command (``client`` and ``watch`` are
  ``wstally.client.commands``), ``main``, the exit statuses.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from wstally import __version__, logsetup
from wstally.cli import history, logs, serve
from wstally.client import commands as client_commands
from wstally.options import apply_env

__all__ = ["main"]


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="wstally",
        description="A shared running total over WebSockets.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"wstally {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parser(commands)
    client_commands.add_parsers(commands)
    logs.add_parser(commands)
    history.add_parser(commands)
    return parser, commands.choices


EXIT_CODES = """exit status (every command):
  0    done, nothing lost (serve: stopped by SIGINT or SIGTERM after draining)
  1    it ran, and something failed: an add refused or never acknowledged, a failed
       check (history --verify), a server that could not start or had to be forced
  2    nothing was done: a usage error (flag, argument, URL, WSTALLY_* value), or the
       server, database or file it needs could not be reached or read
  130  interrupted by Ctrl-C (serve excepted: SIGINT stops it gracefully)"""


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
        return serve.run(args)
    if args.command in ("client", "watch"):
        return client_commands.run(args)
    if args.command == "logs":
        return logs.run(args)
    if args.command == "history":
        return history.run(args, from_env)
    raise AssertionError(f"unhandled command {args.command}")
