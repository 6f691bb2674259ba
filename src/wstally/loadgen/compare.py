"""``--compare naive``: the same load against wstally and the naive reference, and the ratios."""

from __future__ import annotations

import argparse
import json
import shlex
from typing import Any, NamedTuple

from rich.console import Console
from rich.table import Table

from wstally.loadgen import naive_server
from wstally.loadgen.coordinator import LoadTest
from wstally.loadgen.report import show

__all__ = ["Ratio", "compare", "ratios"]

RATES = ("deliveries_per_s", "ingest_per_s")  # higher is better: wstally / naive
LATENCIES = ("ack_ms", "fanout_ms")  # their p99, lower is better: naive / wstally


class Ratio(NamedTuple):
    """One row of the comparison, as printed and as written to ``--json``."""

    key: str  # in the JSON's "ratios"
    ours: str
    theirs: str
    ratio: float
    shown: str


def compare(args: argparse.Namespace, console: Console) -> int:
    """The same load against wstally and the naive reference, one after the other."""
    naive = shlex.join(naive_server.COMMAND)
    runs: dict[str, dict[str, Any]] = {}
    codes = []
    for label, command in (("wstally", args.server_cmd), ("naive", naive)):
        console.rule(label)
        run_args = argparse.Namespace(
            **{**vars(args), "spawn": True, "server_cmd": command, "json": None}
        )
        test = LoadTest(run_args, console, label)
        codes.append(test.run())
        runs[label] = test.figures
    rows = ratios(runs["wstally"], runs["naive"])
    show(console, _table(rows))
    if args.json:
        with open(args.json, "w") as out:
            found = {row.key: round(row.ratio, 2) for row in rows}
            json.dump({"runs": runs, "ratios": found}, out, indent=2)
    # The naive server may fail the verdict under load; only our own verdict decides.
    return codes[0]


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> list[Ratio]:
    """Rates as wstally / naive; p99 latencies as naive / wstally (times better), when
    both runs measured them."""
    rows = []
    for key in RATES:
        mine, other = ours.get(key, 0), theirs.get(key, 0)
        ratio = mine / other if other else float("inf")
        rows.append(Ratio(key, f"{mine:,.0f}", f"{other:,.0f}", ratio, f"{ratio:.1f}x"))
    for key in LATENCIES:
        mine, other = ours.get(key, {}).get("p99"), theirs.get(key, {}).get("p99")
        if mine and other:
            ratio = other / mine
            shown = f"{ratio:.1f}x better"
            rows.append(Ratio(f"{key}_p99", f"{mine:.2f}", f"{other:.2f}", ratio, shown))
    return rows


def _table(rows: list[Ratio]) -> Table:
    table = Table(title="wstally / naive")
    for column in ("figure", "wstally", "naive", "ratio"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row.key.replace("_p99", " p99"), row.ours, row.theirs, row.shown)
    return table
