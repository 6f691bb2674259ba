"""The server's WebSocket connection: websockets' own, plus a frame budget and a read hold.

websockets answers pings and buffers frames before the handler ever sees them, so a budget
kept in the handler would miss a ping flood entirely: it is counted here, per frame, as the
frames come off the wire. The read hold lets a shutdown stop reading, answer every frame
already read, and only then send the close frame.
"""

from __future__ import annotations

from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode, Frame

from wstally import logsetup

__all__ = ["FLOOD", "TallyConnection", "connection_class"]

log = logsetup.get_logger("wstally.server")

# Close code for a connection that sends frames faster than its budget (protocol.md).
FLOOD = CloseCode.POLICY_VIOLATION


def _stay_paused() -> None:
    """Stands in for websockets' resume-reading callback while reads are held."""


class TallyConnection(ServerConnection):
    # Frames per second a connection may send, every kind counted (text, binary, ping,
    # pong, continuation); 0 disables the budget. Set on a subclass per server.
    frame_limit = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A fixed one-second window: one increment and one comparison per frame; the clock
        # is read only when the count passes the limit.
        self._frames = 0
        self._window = 0.0
        self.flooded = False

    def process_event(self, event: Any) -> None:
        super().process_event(event)
        if self.frame_limit and type(event) is Frame:
            self._frames += 1
            if self._frames > self.frame_limit:
                self._over_budget()

    def _over_budget(self) -> None:
        now = self.loop.time()
        if now - self._window >= 1.0:
            self._window = now
            self._frames = 1
            return
        if self.flooded:
            return
        self.flooded = True
        log.warning("conn.flood", conn=logsetup.conn_id(self), limit=self.frame_limit)
        self.protocol.fail(FLOOD, f"too many frames: at most {self.frame_limit} per second")
        self.send_data()
        # The close handshake would wait on a client that is busy flooding: cut it short.
        self.loop.call_later(1.0, self.transport.abort)

    # Shutdown

    def hold_reading(self) -> None:
        """Read nothing more from the socket; frames already read stay queued."""
        if self.protocol.state.name in ("CLOSING", "CLOSED"):
            return
        self.transport.pause_reading()
        # websockets resumes reading once the handler drains its queue: not any more.
        self.recv_messages.resume = _stay_paused

    def queued(self) -> int:
        """Frames read from the socket that the handler has not taken yet."""
        return len(self.recv_messages.frames)


def connection_class(frame_limit: int) -> type[TallyConnection]:
    """A connection class with this server's frame budget."""
    return type("TallyConnection", (TallyConnection,), {"frame_limit": frame_limit})
