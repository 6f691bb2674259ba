"""The server's settings, and their defaults: spelled here once, read by the command line
(which shows them in --help) and by the server."""

from __future__ import annotations

from dataclasses import dataclass

from wstally.engine.base import Engine
from wstally.engine.local import LocalEngine
from wstally.store import MemoryStore, SQLiteStore, Store

__all__ = ["DEFAULTS", "ServerConfig"]


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    db: str = "wstally.db"
    memory: bool = False
    compression: bool = False
    buffer_limit: int = 256 * 1024
    flush_interval: float = 0.002
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    open_timeout: float | None = 10.0
    close_timeout: float | None = 10.0
    stats_interval: float = 10.0  # seconds between server.stats events; 0: none
    # Access: a shared secret, browser origins allowed, TLS.
    token: str | None = None
    allow_origins: list[str] | None = None
    certfile: str | None = None
    keyfile: str | None = None
    # Limits: connections, adds per second per connection (token bucket), slow consumers.
    max_connections: int = 20_000
    rate_limit: float = 10_000.0
    slow_timeout: float = 5.0
    # Frames per second per connection, every kind (pings included); past it: close 1008.
    # Twice the add rate limit, so that a client at the rate limit never gets near it.
    frame_limit: int = 20_000
    # Malformed frames per second per connection (each costs an error frame); past it: 1008.
    invalid_limit: int = 100
    # Seconds an address that flooded is refused new connections (429), doubling at each
    # repeat (penalty.py); 0: never. Behind a proxy every client shares its address: 0 there.
    flood_ban: float = 1.0
    # Several nodes, one total: the shared Redis engine instead of the local store.
    redis: str | None = None
    redis_prefix: str = "wstally"
    node: str | None = None  # this node's name in Redis and /healthz (default: host:pid)
    reuse_port: bool = False  # several processes serving one port (SO_REUSEPORT)
    metrics: bool = True  # GET /metrics (off: 404, and no per-add latency histogram)

    def open_store(self) -> Store:
        return MemoryStore() if self.memory else SQLiteStore(self.db)

    def open_engine(self) -> Engine:
        if self.redis is not None:
            from wstally.engine.redis import RedisEngine

            return RedisEngine(self.redis, self.redis_prefix, node=self.node)
        return LocalEngine(self.open_store, "memory" if self.memory else "sqlite")


DEFAULTS = ServerConfig()
