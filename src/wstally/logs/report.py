"""The ``--summary`` report: a Summary's figures as rich tables, one per question."""

from __future__ import annotations

import math
from typing import IO, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from wstally.logs.render import short_ts
from wstally.logs.scan import Counts
from wstally.logs.summary import ClientFigures, ClientKey, Summary
from wstally.logs.values import LEVELS, as_number
from wstally.text import escape_text

__all__ = ["render", "tables"]

_CLOSE_CODES = {
    1000: "normal",
    1001: "going away",
    1002: "protocol error",
    1003: "unsupported data",
    1005: "no status",
    1006: "abnormal (no close frame)",
    1007: "invalid data",
    1008: "policy violation",
    1009: "message too big",
    1011: "internal error",
}


def render(summary: Summary, out: IO[str], totals: Counts, width: int | None = None) -> None:
    """Print every table to ``out`` (``width`` None: the terminal's, or COLUMNS)."""
    console = Console(file=out, width=width, highlight=False)
    for table in tables(summary, totals):
        console.print(table)


def tables(summary: Summary, totals: Counts) -> list[Table]:
    return [
        _overview(summary, totals),
        _events(summary),
        _levels(summary),
        _clients(summary),
        _refusals(summary),
        _close_codes(summary),
        _commits(summary),
        _talkers(summary),
    ]


def _cell(value: Any, limit: int = 40) -> Text:
    # Text, not a str: rich would read "[...]" in a peer's name as markup.
    return Text("-" if value is None else escape_text(str(value), limit))


def _count(value: Any) -> Text:
    """A number from a log line as every count in these tables is shown: ``1,001``."""
    if type(value) is int:
        return Text(f"{value:,}")
    if type(value) is float and math.isfinite(value):
        return Text(f"{value:,.3f}".rstrip("0").rstrip("."))
    return _cell(value)  # whatever an edited log holds, shown as written


def _seconds(value: Any) -> Text:
    number = as_number(value) if type(value) is not str else None
    return Text(_duration(number)) if number is not None and number >= 0 else _cell(value)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"  # most connections of a piped client
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _table(title: str, *columns: str, right: tuple[str, ...] = ("count",), **options: Any) -> Table:
    """A table titled on its left; the columns named in ``right`` (figures) justified right."""
    table = Table(title=title, title_justify="left", **options)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    return table


def _overview(summary: Summary, totals: Counts) -> Table:
    overview = Table(title="wstally logs --summary", show_header=False, title_justify="left")
    overview.add_column("what", style="bold")
    overview.add_column("value")
    first, last = summary.first, summary.last
    span = f"{short_ts(first)} → {short_ts(last)}" if first else "-"
    rows = [
        ("lines read", f"{totals.lines:,}"),
        ("events matched", f"{totals.matched:,}"),
        ("malformed lines", f"{totals.malformed:,}"),
        ("time span (UTC)", span),
        ("server starts", f"{summary.starts:,}"),
        ("lag episodes", f"{summary.lag_episodes:,}"),
        ("store failures", f"{summary.failures:,}"),
        ("connections open at the end", f"{len(summary.open_conns):,}"),
    ]
    for what, value in rows:
        overview.add_row(what, value)
    return overview


def _events(summary: Summary) -> Table:
    events = _table("Events", "event", "level", "count")
    for (name, level), count in sorted(summary.events.items(), key=lambda kv: -kv[1]):
        events.add_row(_cell(name, 60), _cell(level), f"{count:,}")
    return events


def _levels(summary: Summary) -> Table:
    levels: dict[str, int] = {}
    for (_, level), count in summary.events.items():
        levels[level] = levels.get(level, 0) + count
    by_level = _table("Levels", "level", "count")
    for level, count in sorted(levels.items(), key=lambda kv: -LEVELS.get(kv[0], 0)):
        by_level.add_row(_cell(level), f"{count:,}")
    return by_level


def _clients(summary: Summary) -> Table:
    # update.applied (debug) counts every add and its delta; conn.closed counts the adds and,
    # from wstally 0.2 on, sums their deltas (delta_sum); older logs without debug events
    # have no sum of deltas to show, and no column for it.
    from_debug = summary.applied_events > 0
    from_closed = not from_debug and summary.delta_sums > 0
    if from_debug:
        source = "adds and Σ delta from update.applied (debug)"
    elif from_closed:
        source = "adds and Σ delta from conn.closed"
    else:
        source = "adds from conn.closed; Σ delta needs a --log-level debug log"
    numbers = ["connections", "time connected", "adds", "Σ delta", "refused", "lagged"]
    if not (from_debug or from_closed):
        numbers.remove("Σ delta")
    clients = _table("Clients", "name", "client", *numbers, right=tuple(numbers), caption=source)
    shown = max(summary.top * 4, 20)
    ranked = sorted(summary.clients.items(), key=_rank)
    for key, f in ranked[:shown]:
        adds = f.applied if from_debug else f.adds
        cells = [f"{f.connections:,}", _duration(f.seconds), f"{adds:,}"]
        if from_debug:
            cells.append(f"{f.deltas:+,}")
        elif from_closed:
            cells.append(f"{f.closed_deltas:+,}")
        cells += [f"{f.refused:,}", f"{f.lagged:,}"]
        clients.add_row(_cell(f.name), _who(key, f), *cells)
    if len(ranked) > shown:
        clients.add_row(Text(f"… {len(ranked) - shown:,} more"))
    return clients


def _rank(item: tuple[ClientKey, ClientFigures]) -> tuple[Any, ...]:
    # Most connections first; then names, then bare client ids, then hosts, alphabetically.
    (kind, value), figures = item
    return (-figures.connections, ("name", "id", "host").index(kind), value)


def _who(key: ClientKey, figures: ClientFigures) -> Text:
    """The client column: its hello client id, how many when a name came with several, or
    how it connected without a hello (``(plain) HOST``)."""
    kind, value = key
    if kind == "host":
        return _cell(value)
    if len(figures.ids) > 1:
        return Text(f"{len(figures.ids):,} ids")
    return _cell(next(iter(figures.ids), value if kind == "id" else None))


def _refusals(summary: Summary) -> Table:
    refusals = _table("Refusals by code", "code", "count", "example input")
    for code, (count, example) in sorted(summary.refusals.items(), key=lambda kv: -kv[1][0]):
        refusals.add_row(_cell(code), f"{count:,}", _cell(example, 50))
    return refusals


def _close_codes(summary: Summary) -> Table:
    closes = _table("Close codes", "code", "meaning", "count", "most common reason")
    for code, (count, reasons) in sorted(summary.close_codes.items(), key=lambda kv: -kv[1][0]):
        reason = max(reasons.items(), key=lambda kv: kv[1])[0] if reasons else None
        meaning = _CLOSE_CODES.get(code) if isinstance(code, int) else None
        closes.add_row(_cell(code), _cell(meaning), f"{count:,}", _cell(reason, 50))
    return closes


def _commits(summary: Summary) -> Table:
    commits = _table("Slowest commits", "ms", "batch", "when (UTC)", "from", right=("ms", "batch"))
    for ms, ts, batch, source_event in summary.commits or summary.interval_commits:
        commits.add_row(f"{ms:,.3f}", _count(batch), short_ts(ts), _cell(source_event))
    return commits


def _talkers(summary: Summary) -> Table:
    figures = ("messages", "applied", "refused", "bytes in", "time connected")
    talkers = _table(
        "Top talkers (messages in)", "conn", "client", "name", "peer", *figures, right=figures
    )
    for messages, conn, label, name, peer, applied, refused, bytes_in, secs in summary.talkers:
        talkers.add_row(
            _cell(conn),
            _cell(label),
            _cell(name),
            _cell(peer),
            f"{messages:,}",
            _count(applied),
            _count(refused),
            _count(bytes_in),
            _seconds(secs),
        )
    return talkers
