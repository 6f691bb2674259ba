"""The engine's way to Redis: clients set up as the engine needs them, and whether Redis answers.

redis-py's own retries are off (they would resend commands across a Redis restart); the
engine's batch ids make its own resends safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from wstally.logsetup import get_logger

__all__ = ["LOST", "Link", "connect"]

# The errors of a call whose reply never came: Redis may or may not have run it.
LOST = (RedisConnectionError, RedisTimeoutError)


def connect(
    url: str, *, node: str, unavailable_after: float, socket_timeout: float, connections: int
) -> Redis:
    """A client for ``url``: decoded RESP2 replies, no retries of its own, raw stream replies."""
    options: dict[str, Any] = dict(parse_url(url))
    # Ours win over the URL's query (redis-py's from_url lets the URL win): the engine
    # relies on each of these.
    options.update(
        max_connections=connections,
        timeout=unavailable_after,  # waiting for a free connection
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(1.0, unavailable_after),
        # Off: redis-py would resend a command across a restart on its own.
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
        # RESP2 pinned: stream replies are decoded by shape (entries.py), and redis-py 8
        # changed its default to RESP3 (where XREAD answers a map).
        protocol=2,
        client_name=f"wstally:{node}",
    )
    if _hiredis_pack is not None:
        kind = options.get("connection_class", Connection)
        options["connection_class"] = _PACKED.get(kind, kind)
    client = Redis(connection_pool=BlockingConnectionPool(**options))
    # Stream replies stay nested lists: the fields are decoded by position, in one pass.
    client.set_response_callback("XRANGE", _raw)
    client.set_response_callback("XREAD", _raw)
    return client


def _raw(response: Any, **_options: Any) -> Any:
    return response


_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is a dependency; redis-py works without it
    _hiredis_pack = None


def _pack(args: tuple[Any, ...]) -> list[bytes]:
    # redis-py's asyncio connection packs in Python, joining bytes per argument: ~5 us per
    # add of a batch (7 arguments each), more than the script's own work in Redis. hiredis
    # packs the same bytes in C. Multi-word names ("CLIENT ID") are split as redis-py does.
    if isinstance(args[0], str) and " " in args[0]:
        args = (*args[0].split(), *args[1:])
    assert _hiredis_pack is not None
    return [_hiredis_pack(args)]


class _PackedConnection(Connection):
    def pack_command(self, *args: Any) -> list[bytes]:
        return _pack(args)


class _PackedSSLConnection(SSLConnection):
    def pack_command(self, *args: Any) -> list[bytes]:
        return _pack(args)


class _PackedUnixConnection(UnixDomainSocketConnection):
    def pack_command(self, *args: Any) -> list[bytes]:
        return _pack(args)


_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _PackedConnection,
    SSLConnection: _PackedSSLConnection,
    UnixDomainSocketConnection: _PackedUnixConnection,
}


class Link:
    """Whether Redis answers, from every call's outcome; logs the changes, not each failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connected = False
        self.reason = "not open"
        self._down_since: float | None = None

    def up(self) -> None:
        if self.connected:
            return
        self.connected = True
        if self._down_since is not None:
            downtime = round(time.monotonic() - self._down_since, 3)
            get_logger("wstally.engine").info("engine.reconnected", url=self.url, after=downtime)
            self._down_since = None

    def down(self, error: BaseException) -> None:
        self.reason = f"Redis unreachable: {error}"
        if not self.connected and self._down_since is not None:
            return
        self.connected = False
        self._down_since = time.monotonic()
        get_logger("wstally.engine").warning("engine.disconnected", url=self.url, error=str(error))
