"""The history a Redis engine keeps, read for ``wstally history --redis`` and never written.

Only plain reads: HGETALL of the meta hash, XRANGE and XREVRANGE over the log stream in
chunks, XLEN. Nothing here runs the engine's scripts, which would start a new epoch in a
Redis without one: reading a history must not create one.

The stream keeps the last updates only (100,000 by default; the engine trims older ones).
``kept()`` reads it newest first, the first chunk together with the meta hash in one
MULTI/EXEC, so that the entries and the meta describe one moment even while nodes write:
trimming only ever removes the oldest entries, which a reader going backwards reaches last,
so what it gets is always an unbroken run of the newest entries.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from wstally.engine.redis import entry_rows, history_keys, redact_url
from wstally.store import ROW_COLUMNS, StoreError

__all__ = ["CHUNK", "Entry", "RedisHistory"]

# Entries per XRANGE: about a millisecond of Redis's time (an entry is one batch of the
# nodes, ~100 updates under load), so nodes writing beside the reader are never held up
# for long.
CHUNK = 100
_SEQ, _CLIENT, _NAME = (ROW_COLUMNS.index(c) for c in ("seq", "client", "name"))


@dataclass(frozen=True, slots=True)
class Entry:
    """One update of a stream entry as found: the entry's id and epoch, the update as a
    stored row, and whether it is the entry's last (whose seq the entry id must carry)."""

    id: str
    epoch: str | None
    row: tuple[Any, ...]
    last: bool = True

    @classmethod
    def read(cls, raw: Any) -> list[Entry]:
        """The updates of one stream entry (one per batch), oldest first."""
        entry_id, fields = raw
        epoch, rows = entry_rows(fields)
        final = len(rows) - 1
        return [cls(entry_id, epoch, row, i == final) for i, row in enumerate(rows)]


def _raw(response: Any, **_options: Any) -> Any:
    return response


class RedisHistory:
    """Read access to the history kept under ``prefix`` in the Redis at ``url``.

    Every Redis failure becomes a ``StoreError`` that names the Redis (without password).
    """

    def __init__(self, url: str, prefix: str, *, timeout: float = 5.0, chunk: int = CHUNK) -> None:
        self.description = redact_url(url)
        self.prefix = prefix
        self.meta_key, self.log_key, _ids = history_keys(prefix)
        self.chunk = chunk
        try:
            self._redis = Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                decode_responses=True,
                # A tampered entry may hold bytes that are not UTF-8: show them, do not fail.
                encoding_errors="replace",
                # RESP2, as the engine: stream replies are decoded by shape.
                protocol=2,
            )
        except ValueError as exc:
            raise StoreError(f"not a Redis URL: {exc}") from exc
        # Entries stay flat field lists, the shape entry_row() reads.
        for command in ("XRANGE", "XREVRANGE"):
            self._redis.set_response_callback(command, _raw)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # Any: the stream replies are raw lists here, whatever redis-py's stubs announce.
        try:
            return fn(*args, **kwargs)
        except RedisError as exc:
            raise StoreError(f"cannot read Redis at {self.description}: {exc}") from exc

    def meta(self) -> dict[str, str]:
        """The meta hash (epoch, seq, total, pruned); a StoreError when there is no history."""
        meta: dict[str, str] = self._call(self._redis.hgetall, self.meta_key)
        if not meta and not self._call(self._redis.xlen, self.log_key):
            raise self._missing()
        return meta

    def _missing(self) -> StoreError:
        return StoreError(
            f"no wstally history under prefix {self.prefix!r} in Redis at {self.description}"
        )

    # -- listing --------------------------------------------------------------------------

    def rows(
        self, since: int = 0, client: str | None = None, tail: int | None = None
    ) -> Iterator[tuple[Any, ...]]:
        """Rows (``store.ROW_COLUMNS``) after ``since`` in seq order, as ``SQLiteStore.rows``.

        ``client`` keeps the rows of that client id or display name; ``tail`` only the last
        that many.
        """
        self.meta()
        # The last N: read backwards from the newest and stop after N, not through it all.
        entries = self._entries(since) if tail is None else self._entries_back("+", since)
        rows = (
            e.row
            for e in entries
            if (client is None or client in (e.row[_CLIENT], e.row[_NAME])) and _after_seq(e, since)
        )
        if tail is None:
            yield from rows
        else:
            yield from reversed(list(itertools.islice(rows, tail)))

    def _entries(self, since: int) -> Iterator[Entry]:
        """Entries after ``since``, oldest first, up to the newest one when the read began."""
        newest = self._call(self._redis.xrevrange, self.log_key, "+", "-", 1)
        if not newest:
            return
        end, start = newest[0][0], _after(since)
        while True:
            chunk: list[Any] = self._call(self._redis.xrange, self.log_key, start, end, self.chunk)
            for raw in chunk:
                yield from Entry.read(raw)
            if len(chunk) < self.chunk:
                return
            start = "(" + chunk[-1][0]

    def _entries_back(self, end: str, since: int) -> Iterator[Entry]:
        """Entries from ``end`` back to the oldest kept after ``since``, newest first."""
        while True:
            chunk: list[Any] = self._call(
                self._redis.xrevrange, self.log_key, end, _after(since), self.chunk
            )
            for raw in chunk:
                yield from reversed(Entry.read(raw))
            if len(chunk) < self.chunk:
                return
            end = "(" + chunk[-1][0]

    # -- verification ---------------------------------------------------------------------

    def kept(self) -> tuple[dict[str, str], list[Entry]]:
        """The meta hash and every kept entry, oldest first, as of one moment."""
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.xrevrange(self.log_key, "+", "-", self.chunk)
            pipe.hgetall(self.meta_key)
            first, meta = self._call(pipe.execute)
        if not meta and not first:
            raise self._missing()
        entries = [entry for raw in first for entry in reversed(Entry.read(raw))]
        if len(first) == self.chunk:
            entries += self._entries_back("(" + first[-1][0], 0)
        entries.reverse()
        return meta, entries

    def close(self) -> None:
        self._redis.close()


def _after_seq(entry: Entry, since: int) -> bool:
    # A batch entry is stored under its last seq: the first one read may begin at or
    # before ``since``.
    seq = entry.row[_SEQ]
    return type(seq) is not int or seq > since


def _after(since: int) -> str:
    # Entry ids are "<seq>-0": the range bound for the first entry after seq ``since``.
    return str(since + 1) if since > 0 else "-"
