"""What the load test prints: the live progress line, the figures table, the verdict.

Tables are printed whole when the output is not a terminal: a pipe or a file has no width
to wrap at, and a table wrapped at 80 columns is hard to read and to grep.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table

from wstally.loadgen.shared import Counts
from wstally.loadgen.verdict import Check

__all__ = ["ProgressDisplay", "figures_table", "ms", "print_verdict", "progress_line", "show"]

# Seconds between progress lines when the output is not a terminal.
PRINT_EVERY = 2.0
TABLE_MAX = 10_000  # columns a table may take when nothing else limits it


def show(console: Console, table: Table) -> None:
    """Print ``table``: fitted to a terminal, at its natural width anywhere else."""
    if console.is_terminal:
        console.print(table)
        return
    wide = console.options.update_width(TABLE_MAX)
    table.width = Measurement.get(console, wide, table).maximum
    console.print(table, crop=False)


def progress_line(counts: Counts, elapsed: float) -> str:
    rate = counts.acked / elapsed if elapsed else 0
    deliveries = counts.items / elapsed if elapsed else 0
    return (
        f"{elapsed:6.1f}s  connections {counts.connected:,}  acked {counts.acked:,} "
        f"({rate:,.0f}/s)  deliveries {deliveries:,.0f}/s  errors {counts.errors:,}"
    )


class ProgressDisplay:
    """The progress line: redrawn in place on a terminal, printed now and then elsewhere,
    not at all with ``--quiet``."""

    def __init__(self, console: Console, quiet: bool, clock: float) -> None:
        self.console = console
        self.quiet = quiet
        self.live = (
            None
            if quiet or not console.is_terminal
            else Live(console=console, refresh_per_second=4, transient=True)
        )
        self.printed = clock

    def __enter__(self) -> ProgressDisplay:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.live is not None:
            self.live.stop()

    def update(self, line: str, clock: float) -> None:
        if self.live is not None:
            self.live.update(line)
        elif not self.quiet and clock - self.printed >= PRINT_EVERY:
            self.console.print(line)
            self.printed = clock


def ms(figs: dict[str, float], *keys: str) -> str:
    """``p50 / p99 ms`` from a percentiles dict; ``-`` when nothing was measured."""
    if not figs:
        return "-"
    return " / ".join(f"{figs[k]:.2f}" for k in keys) + " ms"


def figures_table(f: dict[str, Any], title: str) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for label, value in (*_load_rows(f), *_server_rows(f), *_node_rows(f)):
        table.add_row(label, value)
    table.add_row("generator CPU (cores)", ", ".join(f"{c:.2f}" for c in f["generator_cpu"]))
    return table


Rows = Iterable[tuple[str, str]]


def _load_rows(f: dict[str, Any]) -> Rows:
    yield (
        "connections",
        f"{f['connections']:,} ({f['connect_failed']} failed) in {f['connect_seconds']} s",
    )
    yield "handshakes/s", f"{f['handshakes_per_s']:,.0f}"
    yield "connect p50 / p99", ms(f["connect_ms"], "p50", "p99")
    yield (
        "adds sent / acked / refused",
        f"{f['sent']:,} / {f['acked']:,} / {sum(f['refused'].values()):,}",
    )
    yield "ingest (acked/s)", f"{f['ingest_per_s']:,.0f}"
    if f["rate_limited"]:
        yield "rate-limited, then resent", f"{f['rate_limited']:,}"
    if f["stalled"]:
        evicted = f"{f['stalled']} / {f['evicted_by_server']}"
        yield "stalled readers / evicted by the server", evicted
    if f["reconnects"]:
        yield "reconnects / adds resent", f"{f['reconnects']:,} / {f['resent']:,}"
    yield "deliveries/s", f"{f['deliveries_per_s']:,.0f}"
    for key, label in (("ack_ms", "ack latency"), ("fanout_ms", "fan-out latency")):
        yield f"{label} p50/p90/p99/p99.9/max", ms(f[key], "p50", "p90", "p99", "p99.9", "max")
    if "probe_ack_ms" in f:
        probe = f["probe_ack_ms"]
        yield "probe ack latency p50/p90/p99/max", ms(probe, "p50", "p90", "p99", "max")


def _server_rows(f: dict[str, Any]) -> Rows:
    if "server_cpu_seconds" in f:
        yield (
            "server CPU s (µs/delivery)",
            f"{f['server_cpu_seconds']} ({f['server_cpu_us_per_delivery']})",
        )
        yield (
            "server RSS / peak (KiB)",
            f"{f['server_rss_kib']:,} / {f['server_peak_rss_kib']:,}",
        )
    if f["unavailable"]:
        yield "unavailable, then resent", f"{f['unavailable']:,}"


def _node_rows(f: dict[str, Any]) -> Rows:
    for node in f.get("nodes", []):
        cpu = f", CPU {node['cpu_seconds']} s" if "cpu_seconds" in node else ""
        yield (
            f"node {node['url']}",
            f"{node['watchers']:,} watchers, {node['senders']} senders, "
            f"{node['ingest_per_s']:,.0f} acked/s, {node['deliveries_per_s']:,.0f} "
            f"deliveries/s{cpu}",
        )
    if "fanout_cross_node_ms" in f:
        for key, label in (("fanout_same_node_ms", "same"), ("fanout_cross_node_ms", "other")):
            figure = ms(f[key], "p50", "p99", "max")
            yield f"fan-out, sender on the {label} node p50/p99/max", figure
    if "redis" in f:
        r = f["redis"]
        yield (
            "Redis CPU s (µs/add); in scripts µs/add",
            f"{r['cpu_seconds']} ({r['cpu_us_per_add']}); {r['script_us_per_add']}",
        )


def print_verdict(console: Console, f: dict[str, Any], checks: list[Check], passed: bool) -> None:
    if f["generator_saturated"]:
        console.print(
            "[yellow]warning: a generator process used >90% of a core: "
            "the generator, not the server, may be the bottleneck; "
            "add --processes"
        )
    for ok, what in checks:
        console.print(("[green]ok  [/] " if ok else "[red]FAIL[/] ") + what)
    console.print("[bold green]PASS" if passed else "[bold red]FAIL")
