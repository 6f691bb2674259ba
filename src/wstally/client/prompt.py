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

from wstally.client.events import (
    Acked,
    Event,
    Paced,
    Presence,
    Refused,
    Snapshot,
    State,
    Updates,
)
from wstally.client.session import Session
from wstally.protocol import ProtocolError, parse_plain
from wstally.text import escape_text

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
                by = escape_text(item.by or "anonymous", 64)
                self.say(
                    ("class:seq", f"#{item.seq:<6} "),
                    ("class:up" if item.delta >= 0 else "class:down", f"{item.delta:+d}"),
                    ("", " → "),
                    ("class:total", f"{item.total:,}"),
                    ("", "  "),
                    ("class:you", "you ✓") if mine else ("class:by", by),
                )
        elif isinstance(event, Acked):
            note = " (already counted)" if event.duplicate else ""
            self.say(("class:ok", f"✓ {event.delta:+d} acked as #{event.seq}{note}"))
        elif isinstance(event, Refused):
            self._refused(event)
        elif isinstance(event, Paced):
            self.say(
                (
                    "class:warn",
                    f"! the server limits adds per second: pacing at about {event.rate:,.0f}/s "
                    "and resending the refused ones",
                )
            )
        elif isinstance(event, Snapshot):
            self._snapshot(event)
        elif isinstance(event, State):
            self._state(event)
        elif isinstance(event, Presence):
            pass  # shown in the toolbar

    def _refused(self, event: Refused) -> None:
        reason = f"({escape_text(event.code, 64)}): {escape_text(event.message, 200)}"
        waiting = self.session.outbox.get(event.req_id or "")
        if event.delta is not None:
            self.say(("class:error", f"! {event.delta:+d} refused {reason}"))
        elif waiting is not None:
            # A "not now" (store failure, shutdown): the add is kept and sent again.
            self.say(("class:warn", f"! {waiting:+d} not applied yet {reason}; resending it"))
        else:
            self.say(("class:error", f"! refused {reason}"))

    def _snapshot(self, event: Snapshot) -> None:
        if event.recovered and event.replayed:
            count = event.replayed
            self.say(
                (
                    "class:ok",
                    f"✓ caught up: the {count} update{'s' * (count != 1)} made while away "
                    "are shown above",
                )
            )
        elif event.recovered:
            self.say(("class:ok", "✓ nothing was missed while away"))
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
            self.say(("class:ok", f"connected to {escape_text(self.session.url, 200)}"))
            pending = len(self.session.outbox)
            if pending:
                self.say(("class:warn", f"resending {pending} unacknowledged add(s)"))
        elif event.state == "closed" and event.error:
            self.say(("class:error", f"! {escape_text(event.error, 300)}"))
        elif event.state == "reconnecting" and event.retry_in is not None:
            self.retry_at = time.monotonic() + event.retry_in
            if event.error != self.last_error:
                self.say(("class:warn", f"! {escape_text(event.error or 'disconnected', 200)}"))
            self.last_error = event.error

    def toolbar(self) -> FormattedText:
        s = self.session
        state = s.state
        if state == "reconnecting" and self.retry_at is not None:
            state = f"reconnecting in {max(0.0, self.retry_at - time.monotonic()):.1f}s"
        pending = len(s.outbox)
        parts = [("", f" total {s.total:,} │ seq {s.seq}")]
        if s.clients is not None:  # known only while connected
            parts.append(("", f" │ {s.clients} client{'s' * (s.clients != 1)}"))
        parts.append(("", f" │ {state}"))
        if pending:
            parts.append(("", f" │ {pending} pending"))
        return FormattedText(parts)


async def run_interactive(session_options: dict[str, Any]) -> int:
    """0 after /quit or Ctrl-D, 1 if adds were left unacknowledged, 2 if the server refused
    the connection for good, 130 after Ctrl-C."""
    view: PromptView
    session = Session(**session_options, on_event=lambda e: view.on_event(e))
    view = PromptView(session)
    with patch_stdout(raw=True):
        view.say(("", f"wstally client: {HELP}"))
        # Network and keyboard run side by side; whichever ends first ends the other.
        how = await session.run_beside(_read_input(session, view))
    if session.outbox:
        print(f"{len(session.outbox)} add(s) were never acknowledged and may not have counted")
    if how == "interrupted":
        return 130
    if how is None and session.fatal:
        return 2
    return 1 if session.outbox else 0


async def _read_input(session: Session, view: PromptView) -> str:
    """Read and send lines until the user leaves: how they left."""
    prompt: PromptSession[str] = PromptSession()
    while True:
        try:
            text = await prompt.prompt_async(
                "> ", bottom_toolbar=view.toolbar, refresh_interval=0.5, style=STYLE
            )
        except EOFError:
            return "quit"
        except KeyboardInterrupt:
            return "interrupted"
        text = text.strip()
        if text in ("/quit", "/exit", "/q"):
            return "quit"
        if text:
            _entered(session, view, text)


def _entered(session: Session, view: PromptView, text: str) -> None:
    if text in ("/help", "?"):
        view.say(("", HELP))
        return
    try:
        delta = parse_plain(text)
    except ProtocolError as exc:
        view.say(("class:error", f"not sent: {exc.message}"))
        return
    session.add(delta)
    if session.state != "connected":
        view.say(("class:warn", f"{delta:+d} queued: will be sent when connected"))
