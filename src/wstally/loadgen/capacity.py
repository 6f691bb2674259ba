"""``--find-capacity``: grow the audience in steps until fan-out p99 passes the limit."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from wstally.loadgen.coordinator import LoadTest
from wstally.loadgen.report import show

__all__ = ["find_capacity"]

DEFAULT_WATCHERS = 100  # --watchers left at its default: start at one --step instead


def find_capacity(args: argparse.Namespace, console: Console) -> int:
    """websocket-bench style: the largest audience whose fan-out p99 held."""
    steps: list[dict[str, Any]] = []
    held = 0
    watchers = args.watchers if args.watchers != DEFAULT_WATCHERS else args.step
    while watchers <= args.max_watchers:
        console.rule(f"{watchers:,} watchers")
        step = _step(args, console, watchers)
        steps.append(step)
        if not step["held"]:
            break
        held = watchers
        watchers += args.step
    show(console, _table(steps, args.p99_limit))
    console.print(f"largest audience that held: [bold]{held:,}[/] watchers")
    if args.json:
        with open(args.json, "w") as out:
            report = {"p99_limit_ms": args.p99_limit, "capacity": held, "steps": steps}
            json.dump(report, out, indent=2)
    return 0 if held else 1


def _step(args: argparse.Namespace, console: Console, watchers: int) -> dict[str, Any]:
    run_args = argparse.Namespace(**{**vars(args), "watchers": watchers, "json": None})
    test = LoadTest(run_args, console)
    code = test.run()
    p99 = test.figures.get("fanout_ms", {}).get("p99")
    return {
        "watchers": watchers,
        "pass": code == 0,
        "fanout_p99_ms": p99,
        "deliveries_per_s": test.figures.get("deliveries_per_s"),
        "held": code == 0 and p99 is not None and p99 <= args.p99_limit,
    }


def _table(steps: list[dict[str, Any]], limit: float) -> Table:
    table = Table(title=f"capacity at fan-out p99 <= {limit:g} ms")
    for column in ("watchers", "verdict", "fan-out p99 ms", "deliveries/s", "held"):
        table.add_column(column, justify="right")
    for step in steps:
        p99 = step["fanout_p99_ms"]
        table.add_row(
            f"{step['watchers']:,}",
            "PASS" if step["pass"] else "FAIL",
            "-" if p99 is None else f"{p99:.1f}",
            f"{step['deliveries_per_s'] or 0:,.0f}",
            "yes" if step["held"] else "no",
        )
    return table
