"""``wstally logs``: the command itself, from parsed options to an exit status."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import IO, Any

from wstally.logs import report
from wstally.logs.errors import LogsError
from wstally.logs.filters import Filter
from wstally.logs.follow import follow
from wstally.logs.render import format_event
from wstally.logs.scan import Counts, Scanner
from wstally.logs.summary import Summary

__all__ = ["run"]


class _Sink:
    """Where matching lines go: back out byte for byte (``--json``), or made readable."""

    def __init__(self, args: argparse.Namespace, out: IO[bytes]) -> None:
        self.out = out
        self.json = args.json
        self.color = not args.json and out.isatty() and "NO_COLOR" not in os.environ

    def emit(self, raw: bytes, event: dict[str, Any]) -> None:
        if self.json:
            self.out.write(raw if raw.endswith(b"\n") else raw + b"\n")
        else:
            self.out.write(format_event(event, self.color).encode() + b"\n")


USAGE = "usage: wstally logs [FILE ...] [options]   (wstally logs --help for more)"


def run(args: argparse.Namespace) -> int:
    """``wstally logs``: exit 0 (also when nothing matched, which it says), or 2 on a bad
    option or an unreadable file."""
    try:
        flt = Filter.from_args(args)
        if args.summary and args.follow:
            raise LogsError("--summary reads to the end; it cannot --follow")
        if not args.files and sys.stdin is not None and sys.stdin.isatty():
            # Waiting for someone to type JSON lines helps nobody: say what it wants.
            print(USAGE, file=sys.stderr)
            raise LogsError(
                "no FILE, and standard input is a terminal: name a log file "
                "(wstally logs server.log) or pipe one in; '-' reads the terminal"
            )
    except LogsError as exc:
        print(f"wstally logs: error: {exc}", file=sys.stderr)
        return 2
    out = sys.stdout.buffer
    summary = Summary(args.top) if args.summary else None
    if summary is not None:
        scanner = Scanner(flt, lambda _raw, event: summary.add(event))
    else:
        scanner = Scanner(flt, _Sink(args, out).emit)
    status = _scan_and_show(args, scanner, out, summary)
    _report_malformed(scanner.counts)
    if status == 0 and not scanner.counts.matched:
        _report_no_match(scanner.counts, hint=summary is None)
    return status


def _scan_and_show(
    args: argparse.Namespace, scanner: Scanner, out: IO[bytes], summary: Summary | None
) -> int:
    try:
        status = _scan(args, scanner, out)
        if summary is not None:
            _show_summary(summary, scanner.counts)
        sys.stdout.flush()
        out.flush()
    except LogsError as exc:
        print(f"wstally logs: error: {exc}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        status = 130
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, and keep Python from complaining
        # when it flushes stdout at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 0
    return status


def _show_summary(summary: Summary, totals: Counts) -> None:
    # Piped, rich would assume 80 columns; 120 give the clients table its eight.
    width = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120
    report.render(summary, sys.stdout, totals, width)


def _report_malformed(counts: Counts) -> None:
    if counts.malformed:
        print(
            f"wstally logs: skipped {counts.malformed:,} malformed line(s) "
            f"(first at {counts.first_malformed})",
            file=sys.stderr,
        )


def _report_no_match(counts: Counts, hint: bool) -> None:
    # On stderr, so that stdout stays what matched (nothing) for a pipe; exit status 0:
    # the log was read, and "none" is an answer, as for a query that returns no rows.
    read = "no line read" if not counts.lines else f"{counts.lines:,} line(s) read"
    more = "; wstally logs --summary FILE counts the events a log holds" if hint else ""
    print(f"wstally logs: no event matched ({read}){more}", file=sys.stderr)


def _scan(args: argparse.Namespace, scanner: Scanner, out: IO[bytes]) -> int:
    paths = list(args.files) or ["-"]
    if args.follow and paths != ["-"]:
        if "-" in paths:
            raise LogsError("--follow reads files; '-' (stdin) cannot be followed with them")
        follow(paths, scanner, out, args.poll_interval, from_end=args.since is None)
        return 0
    status = 0
    for path in paths:
        if path == "-":
            scanner.scan(sys.stdin.buffer, "<stdin>")
        elif not _scan_file(path, scanner):
            status = 2
    return status


def _scan_file(path: str, scanner: Scanner) -> bool:
    """Scan one file; False (having said why) when it cannot be read."""
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed right after it is read
    except OSError as exc:
        print(f"wstally logs: error: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return False
    with file:
        scanner.scan(file, path)
    return True
