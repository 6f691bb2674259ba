"""``wstally client`` on a terminal: type numbers while everyone's updates stream in.

prompt_toolkit keeps the line being typed intact: updates are printed above it
(``patch_stdout``), and a bottom toolbar shows the total and the connection state.
"""

from __future__ import annotations

import time
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.shortcuts import print_formatted_text
from prompt_toolkit.styles import Style

from wstally.client.session import (
    Acked,
    Event,
    Presence,
    Refused,
    Session,
    Snapshot,
    State,
    Updates,
    safe,
)
from wstally.protocol import ProtocolError, parse_plain

__all__ = ["run_interactive"]

STYLE = Style.from_dict(
    {
        "seq": "#888888",
        "up": "ansigreen",
        "down": "ansired",
        "total": "bold",
        "by": "ansicyan",
        "you": "ansimagenta bold",
        "ok": "ansigreen",
        "warn": "ansiyellow",
        "error": "ansired bold",
        "bottom-toolbar": "noreverse bg:#303030 #ffffff",
    }
)

HELP = "type a number (5, -3, +12) and Enter to add it; /quit or Ctrl-D to leave"


class PromptView:
    """Turns session events into lines above the prompt and a status toolbar."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.retry_at: float | None = None
        self.last_error: str | None = None

    def say(self, *parts: tuple[str, str]) -> None:
        print_formatted_text(FormattedText(list(parts)), style=STYLE)

    def on_event(self, event: Event) -> None:
        if isinstance(event, Updates):
            for item in event.items:
                mine = item.seq in event.own
                self.say(
                    ("class:seq", f"#{item.seq:<6} "),
                    ("class:up" if item.delta >= 0 else "class:down", f"{item.delta:+d}"),
                    ("", " → "),
                    ("class:total", f"{item.total:,}"),
                    ("", "  "),
                    ("class:you", "you ✓") if mine else ("class:by", safe(item.by or "anonymous")),
                )
        elif isinstance(event, Acked):
            note = " (already counted)" if event.duplicate else ""
            self.say(("class:ok", f"✓ {event.delta:+d} acked as #{event.seq}{note}"))
        elif isinstance(event, Refused):
            what = f"{event.delta:+d} " if event.delta is not None else ""
            self.say(
                ("class:error", f"! {what}refused ({safe(event.code)}): {safe(event.message, 200)}")
            )
        elif isinstance(event, Snapshot):
            self._snapshot(event)
        elif isinstance(event, State):
            self._state(event)
        elif isinstance(event, Presence):
            pass  # shown in the toolbar

    def _snapshot(self, event: Snapshot) -> None:
        if event.recovered:
            self.say(("class:ok", "✓ caught up: the updates made while away are shown above"))
        elif event.new_history:
            self.say(("class:warn", f"! the server has a new history; total is {event.total:,}"))
        elif event.missed is not None:
            first, last = event.missed
            count = last - first + 1
            self.say(
                (
                    "class:warn",
                    f"! missed {count} update{'s' * (count != 1)} while away "
                    f"(#{first} to #{last}); total is now {event.total:,}",
                )
            )

    def _state(self, event: State) -> None:
        if event.state == "connected":
            self.retry_at = None
            self.say(("class:ok", f"connected to {safe(self.session.url, 200)}"))
            pending = len(self.session.outbox)
            if pending:
                self.say(("class:warn", f"resending {pending} unacknowledged add(s)"))
        elif event.state == "closed" and event.error:
            self.say(("class:error", f"! {safe(event.error, 300)}"))
        elif event.state == "reconnecting" and event.retry_in is not None:
            self.retry_at = time.monotonic() + event.retry_in
            if event.error != self.last_error:
                self.say(("class:warn", f"! {safe(event.error or 'disconnected', 200)}"))
            self.last_error = event.error

    def toolbar(self) -> FormattedText:
        s = self.session
        state = s.state
        if state == "reconnecting" and self.retry_at is not None:
            state = f"reconnecting in {max(0.0, self.retry_at - time.monotonic()):.1f}s"
        pending = len(s.outbox)
        parts = [
            ("", f" total {s.total:,} │ seq {s.seq} │ {s.clients} client"),
            ("", "s" if s.clients != 1 else ""),
            ("", f" │ {state}"),
        ]
        if pending:
            parts.append(("", f" │ {pending} pending"))
        return FormattedText(parts)


async def run_interactive(session_options: dict[str, Any]) -> int:
    view: PromptView
    session = Session(**session_options, on_event=lambda e: view.on_event(e))
    view = PromptView(session)
    prompt: PromptSession[str] = PromptSession()

    async def read_input() -> None:
        while True:
            try:
                text = await prompt.prompt_async(
                    "> ", bottom_toolbar=view.toolbar, refresh_interval=0.5, style=STYLE
                )
            except (EOFError, KeyboardInterrupt):
                return
            text = text.strip()
            if not text:
                continue
            if text in ("/quit", "/exit", "/q"):
                return
            if text in ("/help", "?"):
                view.say(("", HELP))
                continue
            try:
                delta = parse_plain(text)
            except ProtocolError as exc:
                view.say(("class:error", f"not sent: {exc.message}"))
                continue
            session.add(delta)
            if session.state != "connected":
                view.say(("class:warn", f"{delta:+d} queued: will be sent when connected"))

    with patch_stdout(raw=True):
        view.say(("", f"wstally client: {HELP}"))
        # Network and keyboard run side by side; whichever ends first ends the other.
        await session.run_beside(read_input())
    if session.outbox:
        print(f"{len(session.outbox)} add(s) were never acknowledged and may not have counted")
    return 0
