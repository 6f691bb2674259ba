"""``--compare naive|node``: the same load against wstally and a reference server, and the ratios.

The references: ``naive``, the textbook Python server (:mod:`wstally.loadgen.naive_server`),
against which wstally's gains are quoted as "times better"; ``node``, the Node.js ``ws`` peer
of ``benchmarks/`` (:mod:`wstally.loadgen.node_peer`), whose figures are set side by side as
wstally / peer, as docs/benchmarks.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from collections.abc import Callable
from typing import Any, NamedTuple

from rich.console import Console
from rich.table import Table

from wstally.loadgen import naive_server, node_peer
from wstally.loadgen.coordinator import LoadTest
from wstally.loadgen.report import show

__all__ = ["PEERS", "Ratio", "compare", "ratios", "side_by_side"]

RATES = ("deliveries_per_s", "ingest_per_s")  # higher is better: wstally / naive
LATENCIES = ("ack_ms", "fanout_ms")  # their p99, lower is better: naive / wstally

Figures = dict[str, Any]


class Ratio(NamedTuple):
    """One row of the comparison, as printed and as written to ``--json``."""

    key: str  # in the JSON's "ratios"
    ours: str
    theirs: str
    ratio: float
    shown: str


class Figure(NamedTuple):
    """A figure both runs measure, and how its values are shown."""

    key: str  # in the JSON's "ratios"
    name: str  # in a run's figures
    percentile: str | None  # of a latency's percentiles; None: the figure itself
    form: str

    def read(self, figures: Figures) -> Any:
        value = figures.get(self.name)
        return value if self.percentile is None else (value or {}).get(self.percentile)

    def row(self, ours: float, theirs: float, ratio: float, shown: str) -> Ratio:
        return Ratio(self.key, self.form.format(ours), self.form.format(theirs), ratio, shown)


def _rate(name: str) -> Figure:
    return Figure(name, name, None, "{:,.0f}")


def _latency(name: str, percentile: str) -> Figure:
    return Figure(f"{name}_{percentile}", name, percentile, "{:.2f}")


class Peer(NamedTuple):
    """A reference server: its command line (and versions to record), and its ratios."""

    command: Callable[[], tuple[list[str], dict[str, str]]]  # may raise PeerMissing
    ratios: Callable[[Figures, Figures], list[Ratio]]


def compare(args: argparse.Namespace, console: Console) -> int:
    """The same load against wstally and the reference, one after the other."""
    label, peer = args.compare, PEERS[args.compare]
    try:
        command, versions = peer.command()
    except node_peer.PeerMissing as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        return 2
    runs: dict[str, Figures] = {}
    codes = []
    for name, server_cmd in (("wstally", args.server_cmd), (label, shlex.join(command))):
        console.rule(name)
        run_args = argparse.Namespace(
            **{**vars(args), "spawn": True, "server_cmd": server_cmd, "json": None}
        )
        test = LoadTest(run_args, console, name)
        codes.append(test.run())
        runs[name] = test.figures
    rows = peer.ratios(runs["wstally"], runs[label])
    show(console, _table(rows, label))
    if args.json:
        with open(args.json, "w") as out:
            found = {row.key: round(row.ratio, 2) for row in rows}
            peer_about = {"peer": versions} if versions else {}
            json.dump({"runs": runs, "ratios": found, **peer_about}, out, indent=2)
    # The reference may fail the verdict under load; only our own verdict decides.
    return codes[0]


def ratios(ours: Figures, theirs: Figures) -> list[Ratio]:
    """Rates as wstally / naive; p99 latencies as naive / wstally (times better), when
    both runs measured them."""
    rows = []
    for figure in map(_rate, RATES):
        mine, other = figure.read(ours) or 0, figure.read(theirs) or 0
        ratio = mine / other if other else float("inf")
        rows.append(figure.row(mine, other, ratio, f"{ratio:.1f}x"))
    for figure in (_latency(name, "p99") for name in LATENCIES):
        mine, other = figure.read(ours), figure.read(theirs)
        if mine and other:
            ratio = other / mine
            rows.append(figure.row(mine, other, ratio, f"{ratio:.1f}x better"))
    return rows


# Against the Node peer: what issue 14 weighs, rates, latencies and CPU alike.
SIDE_BY_SIDE = (
    _rate("ingest_per_s"),
    _latency("ack_ms", "p50"),
    _latency("ack_ms", "p99"),
    _latency("fanout_ms", "p50"),
    _latency("fanout_ms", "p99"),
    _latency("probe_ack_ms", "p99"),  # with --probe only
    Figure("server_cpu_seconds", "server_cpu_seconds", None, "{:.2f}"),
    Figure("server_cpu_us_per_delivery", "server_cpu_us_per_delivery", None, "{:.3f}"),
)


def side_by_side(ours: Figures, theirs: Figures) -> list[Ratio]:
    """Every figure as wstally / peer (below 1: wstally's is lower), when both runs
    measured it."""
    rows = []
    for figure in SIDE_BY_SIDE:
        mine, other = figure.read(ours), figure.read(theirs)
        if mine is not None and other:
            ratio = mine / other
            rows.append(figure.row(mine, other, ratio, f"{ratio:.2f}"))
    return rows


PEERS = {
    "naive": Peer(lambda: (naive_server.COMMAND, {}), ratios),
    "node": Peer(node_peer.command, side_by_side),
}


def _table(rows: list[Ratio], label: str) -> Table:
    table = Table(title=f"wstally / {label}")
    for column in ("figure", "wstally", label, "ratio"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(re.sub(r"_(p\d+)$", r" \1", row.key), row.ours, row.theirs, row.shown)
    return table
