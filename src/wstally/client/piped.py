"""``wstally client`` with stdin not a terminal: send every number, wait for every ack.

Exit status: 0 when every line was a number and every add was acknowledged; 1 when a line
was skipped, an add refused, or adds were left unacknowledged after the server was reached;
2 when the server could not be reached (or refused the handshake) at all.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any, TextIO

from wstally.client.events import Acked, Event, Paced, Refused, Snapshot, State
from wstally.client.session import Session
from wstally.protocol import ProtocolError, parse_plain
from wstally.text import escape_text

__all__ = ["run_piped"]

POLL = 0.2  # seconds between checks that the server is still reachable


def _read_lines(stream: TextIO, queue: asyncio.Queue[str | None]) -> None:
    loop = asyncio.get_running_loop()

    def pump() -> None:
        # A thread, because a blocking read of stdin cannot be awaited portably.
        try:
            for line in stream:
                loop.call_soon_threadsafe(queue.put_nowait, line)
            loop.call_soon_threadsafe(queue.put_nowait, None)
        except RuntimeError:
            # The loop closed under us (Ctrl-C, say, then stdin's end): no one is left to
            # read the line, and a traceback from this thread would only alarm the user.
            pass

    threading.Thread(target=pump, name="stdin", daemon=True).start()


def _say(text: str) -> None:
    print(f"wstally client: {text}", file=sys.stderr)


class PipedRun:
    """What happened to each line, from the session's events, for the closing summary."""

    def __init__(self, session_options: dict[str, Any], give_up_after: float) -> None:
        self.session = Session(**session_options, on_event=self.on_event)
        self.give_up_after = give_up_after
        self.last_ack: Acked | None = None
        self.acked_sum = 0
        self.refused = 0
        self.skipped = 0
        self.sent = 0
        self.paced = False
        self.down_since: float | None = None
        self.snapshot = asyncio.Event()

    def on_event(self, event: Event) -> None:
        if isinstance(event, Acked):
            self.acked_sum += event.delta
            if self.last_ack is None or event.seq > self.last_ack.seq:
                self.last_ack = event
        elif isinstance(event, Refused) and event.delta is not None:
            self.refused += 1
            code, message = escape_text(event.code, 64), escape_text(event.message, 200)
            _say(f"{event.delta:+d} refused ({code}): {message}")
        elif isinstance(event, Paced) and not self.paced:
            self.paced = True  # said once: the pace keeps adapting quietly
            _say("the server limits adds per second: slowing down, resending the refused ones")
        elif isinstance(event, Snapshot):
            self.snapshot.set()
        elif isinstance(event, State):
            self._state(event)

    def _state(self, event: State) -> None:
        if event.state == "closed" and event.error:
            _say(escape_text(event.error, 300))
        if event.state == "connected":
            self.down_since = None
        elif self.down_since is None:
            self.down_since = time.monotonic()

    async def feed(self, stream: TextIO) -> int:
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        _read_lines(stream, queue)
        lineno = 0
        while (line := await queue.get()) is not None:
            lineno += 1
            if not line.strip():
                continue
            try:
                delta = parse_plain(line.rstrip("\n"))
            except ProtocolError as exc:
                self.skipped += 1
                _say(f"line {lineno} not sent: {exc.message}")
                continue
            self.session.add(delta)
            self.sent += 1
        # Everything is queued: wait for every answer (and at least the first snapshot, for
        # the total), as long as the server stays reachable.
        if not await self._until_reachable(self.session.settled):
            return self._gave_up()
        if self.last_ack is None and not await self._until_reachable(self.snapshot.wait):
            return self._gave_up()
        return self._summary()

    async def _until_reachable(self, wait: Any) -> bool:
        """Await ``wait()``; False if the server stays unreachable for give_up_after."""
        while True:
            try:
                async with asyncio.timeout(POLL):
                    await wait()
                return True
            except TimeoutError:
                since = self.down_since
                if since is not None and time.monotonic() - since > self.give_up_after:
                    return False

    def _gave_up(self) -> int:
        s = self.session
        _say(
            f"no connection to {escape_text(s.url, 200)} for {self.give_up_after:g}s: "
            f"{escape_text(s.error or 'unreachable', 300)}; {len(s.outbox)} add(s) unacknowledged"
        )
        return 1 if s.connected_once.is_set() else 2

    def _summary(self) -> int:
        acked = self.sent - self.refused
        parts = [f"{acked} of {self.sent} add(s) acknowledged (sum {self.acked_sum:+d})"]
        if self.refused:
            parts.append(f"{self.refused} refused")
        if self.skipped:
            parts.append(f"{self.skipped} line(s) skipped: not a number")
        _say("; ".join(parts))
        print(self.last_ack.total if self.last_ack is not None else self.session.total)
        return 1 if self.skipped or self.refused else 0

    def ended(self) -> int:
        """The session ended before the input did: the server refused us for good."""
        return 1 if self.session.connected_once.is_set() else 2


async def run_piped(session_options: dict[str, Any], give_up_after: float, stream: TextIO) -> int:
    run = PipedRun(session_options, give_up_after)
    code = await run.session.run_beside(run.feed(stream))
    return run.ended() if code is None else code
