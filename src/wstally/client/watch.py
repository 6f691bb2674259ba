"""``wstally watch``: a read-only live view, or one line per update when piped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import deque
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from wstally.client.events import Event, Item, Snapshot, State, Updates
from wstally.client.session import Session
from wstally.text import escape_text

__all__ = ["run_watch"]


class WatchView:
    """The state behind the live display: totals, a rate window and recent updates."""

    def __init__(self, session: Session, keep: int = 10) -> None:
        self.session = session
        self.recent: deque[Item] = deque(maxlen=keep)
        self.arrivals: deque[tuple[float, int]] = deque()
        self.note = ""  # about the history: updates missed while away
        self.problem = ""  # about the connection: shown until it is back

    def on_event(self, event: Event) -> None:
        if isinstance(event, Updates):
            self.recent.extend(event.items)
            self.arrivals.append((time.monotonic(), len(event.items)))
        elif isinstance(event, Snapshot) and event.missed is not None:
            self.note = f"missed #{event.missed[0]} to #{event.missed[1]} while away"
        elif isinstance(event, State) and event.state == "connected":
            self.problem = ""
        elif isinstance(event, State) and event.error:
            self.problem = escape_text(event.error, 120)

    def rate(self, window: float = 5.0) -> float:
        now = time.monotonic()
        while self.arrivals and self.arrivals[0][0] < now - window:
            self.arrivals.popleft()
        return sum(n for _, n in self.arrivals) / window

    def render(self) -> Panel:
        s = self.session
        big = Text(f"{s.total:,}", style="bold green", justify="center")
        fields = [f"seq {s.seq}"]
        if s.clients is not None:  # known only while connected
            fields.append(f"{s.clients} client{'s' * (s.clients != 1)}")
        fields += [f"{self.rate():.1f} updates/s", s.state]
        stats = Text("  ·  ".join(fields), justify="center")
        table = Table(expand=True, show_edge=False, box=None)
        for column in ("seq", "delta", "total", "by"):
            table.add_column(column, justify="right" if column != "by" else "left")
        for item in reversed(self.recent):
            table.add_row(
                str(item.seq),
                f"{item.delta:+d}",
                f"{item.total:,}",
                escape_text(item.by or "anonymous", 64),
            )
        parts: list[Text | Table] = [big, stats, table]
        parts += [Text(note, style="yellow") for note in (self.note, self.problem) if note]
        return Panel(Group(*parts), title=f"wstally · {escape_text(s.url, 80)}")


async def run_watch(
    session_options: dict[str, Any], as_json: bool, exit_after: int | None, tty: bool
) -> int:
    """0 after --exit-after N updates; 2 if the server refused the connection for good.

    (Ctrl-C, the usual way to leave, is 130: see commands.run.)
    """
    seen = [0]
    done = asyncio.Event()
    view: WatchView

    def on_event(event: Event) -> None:
        if tty:
            view.on_event(event)
        elif isinstance(event, Updates):
            for item in event.items:
                _print_line(item, as_json)
        if isinstance(event, Updates):
            seen[0] += len(event.items)
            if exit_after is not None and seen[0] >= exit_after:
                done.set()

    session = Session(**session_options, on_event=on_event)
    view = WatchView(session)

    async def show() -> None:
        if not tty:
            await done.wait()
            return
        with Live(view.render(), console=Console(), refresh_per_second=8) as live:
            while not done.is_set():
                live.update(view.render())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.125):
                        await done.wait()

    await session.run_beside(show())
    if session.fatal:
        # After the live view is gone, so that the reason stays on the screen.
        print(f"wstally watch: {escape_text(str(session.error), 300)}", file=sys.stderr)
        return 2
    return 0


def _print_line(item: Item, as_json: bool) -> None:
    if as_json:
        line = json.dumps(
            {"seq": item.seq, "delta": item.delta, "total": item.total, "by": item.by}
        )
    else:
        by = escape_text(item.by or "-", 64)
        line = f"seq={item.seq} delta={item.delta:+d} total={item.total} by={by}"
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
