"""The figures of ``wstally logs --summary``, built in one pass, line by line.

Pure aggregation: events in, counts and short ranked lists out. How they are shown is
``report``'s business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wstally.logs.values import as_int, as_key, as_number

__all__ = ["ClientFigures", "ClientKey", "Summary", "client_key"]

# ("name", hello name), ("id", hello client id) or ("host", "(plain) HOST"): kinds kept
# apart, so that no name can pass for another client's id or for a host.
ClientKey = tuple[str, str]


@dataclass(slots=True)
class ClientFigures:
    name: str | None = None
    ids: set[str] = field(default_factory=set)  # the hello client ids it came with
    connections: int = 0
    seconds: float = 0.0
    adds: int = 0  # from conn.closed
    applied: int = 0  # from update.applied (debug)
    deltas: int = 0  # from update.applied (debug)
    closed_deltas: int = 0  # from conn.closed's delta_sum (wstally 0.2 on)
    refused: int = 0
    lagged: int = 0
    messages: int = 0


def _label(event: dict[str, Any]) -> str:
    """Who a connection was: its client id, or its mode and host when it said no hello."""
    client = event.get("client")
    if isinstance(client, str):
        return client
    peer = event.get("peer")
    host = peer.rpartition(":")[0] if isinstance(peer, str) else "?"
    kind = "plain" if event.get("mode") == "plain" else "no hello"
    return f"({kind}) {host}"


def client_key(event: dict[str, Any]) -> ClientKey:
    """The row a connection counts in: its hello name, else its client id, else its host.

    By name first: ``wstally client --name ann`` makes a new client id at every run, and
    those runs are one person to whoever reads the table.
    """
    name = event.get("name")
    if isinstance(name, str) and name:
        return ("name", name)
    client = event.get("client")
    if isinstance(client, str):
        return ("id", client)
    return ("host", _label(event))


def _top(items: list[tuple[Any, ...]], item: tuple[Any, ...], keep: int) -> None:
    # A short sorted list beats a heap for the handful of rows a table shows.
    if len(items) < keep or item[0] > items[-1][0]:
        items.append(item)
        items.sort(key=lambda i: i[0], reverse=True)
        del items[keep:]


class Summary:
    """Aggregates for ``--summary``: every figure is built in one pass, line by line."""

    def __init__(self, top: int = 5) -> None:
        self.top = top
        self.events: dict[tuple[str, str], int] = {}
        self.first: str | None = None
        self.last: str | None = None
        self.clients: dict[ClientKey, ClientFigures] = {}
        self._by_conn: dict[str, ClientFigures] = {}
        self.applied_events = 0
        self.delta_sums = 0  # conn.closed events that carried delta_sum
        self.refusals: dict[str, list[Any]] = {}
        self.close_codes: dict[Any, list[Any]] = {}
        # Slowest commits: each one (debug store.committed, or store.commit_slow), or else
        # the slowest of each server.stats interval.
        self.commits: list[tuple[Any, ...]] = []
        self.interval_commits: list[tuple[Any, ...]] = []
        self.talkers: list[tuple[Any, ...]] = []
        self.open_conns: dict[str, None] = {}
        self.starts = 0
        self.lag_episodes = 0
        self.failures = 0
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "conn.opened": self._opened,
            "conn.closed": self._closed,
            "update.applied": self._applied,
            "update.refused": self._refused,
            "server.stats": self._stats,
            "server.started": self._started,
            "store.committed": self._committed,
            "store.commit_slow": self._committed,
            "store.commit_failed": self._failed,
            "broadcast.lagging": self._lagging,
        }

    def add(self, event: dict[str, Any]) -> None:
        """Count one event, and feed it to the figures its name concerns."""
        name = event.get("event")
        level = event.get("level")
        if type(name) is not str or type(level) is not str:
            name, level = str(name), str(level)
        key = (name, level)
        events = self.events
        events[key] = events.get(key, 0) + 1
        ts = event.get("timestamp")
        if type(ts) is str:
            # Lines usually come in time order: one comparison for most of them.
            if self.last is None or ts > self.last:
                self.last = ts
            elif self.first is None or ts < self.first:
                self.first = ts
            if self.first is None:
                self.first = ts
        handler = self._handlers.get(name)
        if handler is not None:
            handler(event)

    def _client(self, event: dict[str, Any]) -> ClientFigures:
        key = client_key(event)
        figures = self.clients.get(key)
        if figures is None:
            figures = self.clients[key] = ClientFigures()
            if key[0] == "name":
                figures.name = key[1]
        client = event.get("client")
        if isinstance(client, str):
            figures.ids.add(client)
        return figures

    def _opened(self, event: dict[str, Any]) -> None:
        conn = event.get("conn")
        if isinstance(conn, str):
            self.open_conns[conn] = None

    def _closed(self, event: dict[str, Any]) -> None:
        conn = event.get("conn")
        if isinstance(conn, str):
            self.open_conns.pop(conn, None)
            self._by_conn.pop(conn, None)
        figures = self._client(event)
        figures.connections += 1
        figures.seconds += as_number(event.get("duration")) or 0.0
        figures.adds += as_int(event.get("applied"))
        if isinstance(event.get("delta_sum"), int):
            self.delta_sums += 1
            figures.closed_deltas += event["delta_sum"]
        figures.refused += as_int(event.get("refused"))
        figures.lagged += as_int(event.get("lagged"))
        messages = as_int(event.get("messages_in"))
        figures.messages += messages
        self._close_code(event)
        talker = (
            messages,
            str(conn),
            _label(event),
            event.get("name"),
            event.get("peer"),
            event.get("applied"),
            event.get("refused"),
            event.get("bytes_in"),
            event.get("duration"),
        )
        _top(self.talkers, talker, self.top)

    def _close_code(self, event: dict[str, Any]) -> None:
        entry = self.close_codes.setdefault(as_key(event.get("code")), [0, {}])
        entry[0] += 1
        reason = as_key(event.get("reason"))
        if reason:
            entry[1][reason] = entry[1].get(reason, 0) + 1

    def _applied(self, event: dict[str, Any]) -> None:
        self.applied_events += 1
        # Once a connection has added, its client is settled (no hello after an add).
        conn = event.get("conn")
        figures = self._by_conn.get(conn) if type(conn) is str else None
        if figures is None:
            figures = self._client(event)
            if type(conn) is str:
                self._by_conn[conn] = figures
        figures.applied += 1
        delta = event.get("delta")
        if isinstance(delta, int):
            figures.deltas += delta

    def _refused(self, event: dict[str, Any]) -> None:
        code = str(event.get("code"))
        entry = self.refusals.get(code)
        if entry is None:
            entry = self.refusals[code] = [0, event.get("input")]
        entry[0] += 1

    def _stats(self, event: dict[str, Any]) -> None:
        ms = as_number(event.get("commit_max_ms"))
        if ms:
            batch = event.get("batch_max")
            item = (ms, event.get("timestamp"), batch, "server.stats (interval max)")
            _top(self.interval_commits, item, self.top)

    def _started(self, event: dict[str, Any]) -> None:
        self.starts += 1

    def _committed(self, event: dict[str, Any]) -> None:
        ms = as_number(event.get("ms"))
        if ms is not None:
            item = (ms, event.get("timestamp"), event.get("batch"), str(event.get("event")))
            _top(self.commits, item, self.top)

    def _failed(self, event: dict[str, Any]) -> None:
        self.failures += 1

    def _lagging(self, event: dict[str, Any]) -> None:
        self.lag_episodes += 1
