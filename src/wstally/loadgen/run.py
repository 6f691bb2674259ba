"""The load test's entry point (scripts/loadtest.py): parse, pick the kind of run, exit status.

The parts, in the order a run uses them: :mod:`~wstally.loadgen.cli` (flags),
:mod:`~wstally.loadgen.targets` (servers), :mod:`~wstally.loadgen.coordinator` (one run),
:mod:`~wstally.loadgen.worker` (each generator process), :mod:`~wstally.loadgen.verdict`,
:mod:`~wstally.loadgen.figures` and :mod:`~wstally.loadgen.report` (what it concludes and
prints); :mod:`~wstally.loadgen.compare` and :mod:`~wstally.loadgen.capacity` repeat runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rich.console import Console

from wstally.loadgen.capacity import find_capacity
from wstally.loadgen.cli import parse_args
from wstally.loadgen.compare import compare
from wstally.loadgen.coordinator import LoadTest

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """0 PASS, 1 FAIL, 2 usage error or no server, 130 interrupted (README, "Exit status")."""
    args = parse_args(argv)
    console = Console(stderr=False)
    # A pipe or a file has no width: long lines (a failed check, the progress line) are
    # written whole rather than wrapped at 80 columns.
    console.soft_wrap = not console.is_terminal
    try:
        if args.compare:
            return compare(args, console)
        if args.find_capacity:
            return find_capacity(args, console)
        return LoadTest(args, console).run()
    except KeyboardInterrupt:
        console.print("interrupted: no verdict", markup=False, highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
