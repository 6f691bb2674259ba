"""``RedisEngine``: open, submit, history, status and close, over the package's parts.

Batches are serialised and resent with their batch id after a lost reply; a batch that meets
another history fails, and the feed is woken to announce it. No redis-py call is ever
cancelled in flight (a cancelled call once left a connection handing out the wrong
replies): calls run in their own task behind ``asyncio.shield``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from wstally.engine.base import EngineError, FeedEvent, Position, Reset, Result, Submission
from wstally.engine.redis.entries import decode, encode, history_keys, results
from wstally.engine.redis.feed import BLOCK_MS, CHUNK, Follower
from wstally.engine.redis.link import LOST, Link, connect
from wstally.engine.redis.lua import BATCH_LUA, OPEN_LUA, Script
from wstally.logsetup import get_logger
from wstally.store.base import new_epoch
from wstally.tally import DEDUP_WINDOW, Update

__all__ = ["RedisEngine", "durability_risks", "redact_url"]

T = TypeVar("T")

# A node's last reply outlives any resend of its batch (bounded by unavailable_after) by far.
_REPLY_TTL = 300

# Redis errors that go away by themselves: resending later may work.
_TRANSIENT = ("OOM", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "NOREPLICAS", "CLUSTERDOWN")


def redact_url(url: str) -> str:
    """``url`` without its password (in the authority or a ``password=`` query field)."""
    # Edited in place rather than rebuilt: urlunsplit would turn unix:///path into unix:/path.
    parts = urllib.parse.urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        url = url.replace(parts.netloc, f"{parts.username or ''}:***@{host}", 1)
    head, mark, tail = url.partition("?")
    if mark:
        query, hash_, fragment = tail.partition("#")
        fields = ["password=***" if f.startswith("password=") else f for f in query.split("&")]
        url = head + mark + "&".join(fields) + hash_ + fragment
    return url


def durability_risks(config: dict[str, str]) -> list[str]:
    """Why an acknowledged add could be lost under this Redis configuration (none: [])."""
    risks = []
    if config.get("appendonly") != "yes":
        risks.append("appendonly is not yes: a restart loses adds since the last snapshot")
    elif config.get("appendfsync") != "always":
        fsync = config.get("appendfsync")
        risks.append(f"appendfsync is {fsync}, not always: a power cut can lose acked adds")
    policy = config.get("maxmemory-policy")
    if policy != "noeviction":
        risks.append(f"maxmemory-policy is {policy}: an evicted key starts a new history")
    return risks


def _default_node() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _store_failed(exc: RedisError) -> EngineError:
    """An error Redis answered (or a reply redis-py could not read): retrying in the engine
    would not help; some of them pass with time (out of memory, a replica promoted)."""
    message = str(exc)
    transient = not isinstance(exc, ResponseError) or message.startswith(_TRANSIENT)
    return EngineError("store_failed", f"Redis refused: {message}", transient=transient)


class RedisEngine:
    """The engine seam over Redis (7.0 or later); see the package docstring for the layout."""

    name = "redis"

    def __init__(
        self,
        url: str,
        prefix: str = "wstally",
        *,
        node: str | None = None,
        window: int = DEDUP_WINDOW,
        keep: int = 100_000,
        unavailable_after: float = 2.0,
    ) -> None:
        if window < 1 or keep < 1 or unavailable_after <= 0:
            raise ValueError("window and keep must be at least 1, unavailable_after positive")
        self.url = url
        self.description = redact_url(url)
        self.node = node if node is not None else _default_node()
        self.window = window
        self.keep = keep
        self.unavailable_after = unavailable_after
        self.keys = (*history_keys(prefix), "{" + prefix + "}" + f":node:{self.node}")
        # Batch ids are unique per engine instance, even for a node name used again.
        self._session = new_epoch()
        self._batches = 0
        self._open_script = Script(OPEN_LUA)
        self._batch_script = Script(BATCH_LUA)
        self.link = Link(self.description)
        self._redis: Redis | None = None
        self._position: Position | None = None
        self._epoch = ""  # the history batches apply to: the last one the feed announced
        self._resets = 0
        self._last_reset: str | None = None
        self._submitting = asyncio.Lock()
        self._calls: set[asyncio.Task[Any]] = set()
        self._follower: Follower | None = None
        self._follower_client: Redis | None = None
        self._follower_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> Position:
        self._redis = self._client(socket_timeout=self.unavailable_after, connections=8)
        try:
            epoch, seq, total = await self._shielded(self._retrying(self._read_own_position))
        except RedisError as exc:
            raise _store_failed(exc) from exc
        await self._check_durability()
        self._position = Position(epoch, seq, total)
        self._epoch = epoch
        return self._position

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._stop_follower()
        if self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)
        for client in (self._follower_client, self._redis):
            if client is not None:
                await client.connection_pool.aclose()
                await client.aclose()

    def _client(self, *, socket_timeout: float, connections: int) -> Redis:
        return connect(
            self.url,
            node=self.node,
            unavailable_after=self.unavailable_after,
            socket_timeout=socket_timeout,
            connections=connections,
        )

    # -- batches --------------------------------------------------------------------------

    async def submit(self, batch: Sequence[Submission]) -> list[Result]:
        """Apply ``batch`` in one script; resend it (same batch id) after a lost reply.

        Raises a transient ``EngineError``: ``unavailable`` when Redis did not answer within
        ``unavailable_after`` (outcome unknown) or holds a history other than the one the
        feed announced (nothing applied); ``store_failed`` when Redis refused the script.
        """
        if not batch:
            return []
        if self._closed or self._redis is None:
            raise EngineError("unavailable", "the Redis engine is not open", transient=True)
        reply = await self._shielded(self._run_batch(encode(batch)))
        tokens = reply.split(" ")
        if tokens[0] == "epoch":
            raise await self._new_history(tokens[1])
        if tokens[0] == "stale":  # cannot happen while batches are serialised
            raise EngineError("store_failed", "batch overtaken by a later one", transient=True)
        return results(batch, tokens)

    async def _run_batch(self, adds: list[Any]) -> str:
        redis = self._redis
        assert redis is not None
        # Taken inside the shielded task: a batch whose caller was cancelled still holds it
        # until its last resend is over, so the next batch cannot overtake it.
        async with self._submitting:
            self._batches += 1
            args = [self._epoch, new_epoch(), self.window, self.keep, _REPLY_TTL]
            args += (self._session, self._batches, *adds)

            async def attempt() -> str:
                return str(await self._batch_script.run(redis, self.keys, args))

            try:
                return await self._retrying(attempt)
            except RedisError as exc:
                raise _store_failed(exc) from exc

    async def _new_history(self, epoch: str) -> EngineError:
        """The error for a batch that met another history, once the feed is told to look."""
        follower = self._follower
        if follower is None:
            self._epoch = epoch  # nobody to tell first: the next batch applies there
        else:
            follower.nudge()
            await self._shielded(self._unblock(follower))
        return EngineError(
            "unavailable",
            f"Redis holds a new history (epoch {epoch}); nothing was applied, resend",
            transient=True,
        )

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()`` until Redis answers, for up to ``unavailable_after`` seconds.

        Only for attempts that are safe to repeat: reads, and scripts made idempotent.
        """
        start = time.monotonic()
        delay = 0.02
        while True:
            try:
                result = await attempt()
            except LOST as exc:
                self.link.down(exc)
                waited = time.monotonic() - start
                if waited + delay > self.unavailable_after:
                    raise EngineError(
                        "unavailable",
                        f"Redis ({self.description}) did not answer for {waited:.1f} s: {exc}",
                        transient=True,
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)
            else:
                self.link.up()
                return result

    async def _shielded(self, coro: Coroutine[Any, Any, T]) -> T:
        # A caller cancelled while Redis works must not cancel the redis-py call itself: the
        # call finishes in its own task (close() waits for it) and its connection stays sane.
        task = asyncio.ensure_future(coro)
        self._calls.add(task)
        task.add_done_callback(_forget_call(self._calls))
        return await asyncio.shield(task)

    # -- position and durability -------------------------------------------------------------

    async def _read_own_position(self) -> tuple[str, int, int]:
        assert self._redis is not None
        return await self._read_position(self._redis)

    async def _read_position(self, client: Redis) -> tuple[str, int, int]:
        """The epoch, seq and total in Redis; a new epoch is started when there is none."""
        keys = self.keys[:3]
        epoch, seq, total = await self._open_script.run(client, keys, [new_epoch()])
        return str(epoch), int(seq), int(total)

    async def _check_durability(self) -> None:
        assert self._redis is not None
        log = get_logger("wstally.engine")
        config: dict[str, str] = {}
        try:
            for name in ("appendonly", "appendfsync", "maxmemory-policy"):
                found = await self._redis.config_get(name)
                config.update({str(k): str(v) for k, v in found.items()})
        except RedisError as exc:
            # CONFIG is often renamed or disabled on managed Redis.
            log.warning("engine.durability_unchecked", url=self.description, error=str(exc))
            return
        risks = durability_risks(config)
        if risks:
            log.warning("engine.not_durable", url=self.description, risks=risks)

    # -- feed -----------------------------------------------------------------------------

    def feed(self) -> AsyncIterator[FeedEvent]:
        if self._position is None or self._closed:
            raise RuntimeError("the feed of a Redis engine needs it open")
        if self._follower is not None:
            raise RuntimeError("the Redis engine has one feed")
        self._follower_client = self._client(
            socket_timeout=BLOCK_MS / 1000 + self.unavailable_after, connections=1
        )
        self._follower = Follower(
            self._follower_client, self.keys[1], self.link, self._read_position, self._position
        )
        return self._deliver(self._follower)

    async def _deliver(self, follower: Follower) -> AsyncIterator[FeedEvent]:
        if not self._closed:
            self._follower_task = asyncio.create_task(follower.run())
        while not self._closed:
            event = await follower.queue.get()
            if event is None:
                return
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, Reset):
                self._adopt(event)
            yield event

    def _adopt(self, reset: Reset) -> None:
        # The consumer now knows the new history: batches may apply to it from here on.
        # (It logs the reset, with the position it had.)
        self._epoch = reset.position.epoch
        self._resets += 1
        self._last_reset = reset.reason

    async def _stop_follower(self) -> None:
        follower, task = self._follower, self._follower_task
        if follower is None:
            return
        follower.stopping.set()
        if task is not None:
            deadline = time.monotonic() + BLOCK_MS / 1000 + self.unavailable_after
            while not task.done() and time.monotonic() < deadline:
                if follower.blocked:
                    await self._unblock(follower)
                await asyncio.wait({task}, timeout=0.05)
            if not task.done():
                # Redis hangs: the follower's connection is discarded with its pool below,
                # so a cancelled call cannot hand a stale reply to anyone.
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        follower.end()

    async def _unblock(self, follower: Follower) -> None:
        if self._redis is None or follower.client_id is None:
            return
        # When Redis is gone, the follower's XREAD fails by itself.
        with contextlib.suppress(RedisError):
            await self._redis.client_unblock(follower.client_id)

    # -- history and status ---------------------------------------------------------------

    async def history(self, since: int, limit: int) -> list[Update]:
        if self._redis is None:
            raise EngineError("unavailable", "the Redis engine is not open", transient=True)
        try:
            return await self._shielded(self._history(max(since, 0) + 1, limit))
        except RedisError as exc:
            raise _store_failed(exc) from exc

    async def _history(self, start: int, limit: int) -> list[Update]:
        redis = self._redis
        assert redis is not None
        updates: list[Update] = []
        # An entry is one batch, from one update to hundreds: read a few, then as many as
        # the updates still wanted need at the size seen, rather than CHUNK entries (tens
        # of thousands of updates) for a recovery that asks for 256.
        entries = 8
        while len(updates) < limit:
            count = min(CHUNK, limit - len(updates), entries)

            async def chunk(start: int = start, count: int = count) -> Any:
                # An entry is stored under its last seq: the first may begin before start.
                return await redis.xrange(self.keys[1], str(start), "+", count)

            rows = await self._retrying(chunk)
            read = len(updates)
            for _id, f in rows:
                if f[1] != self._epoch:
                    return updates  # a history the feed has not announced yet
                updates += [u for u in decode(f) if u.seq >= start]
            if len(rows) < count:
                break
            start = updates[-1].seq + 1
            per_entry = max(1, (len(updates) - read) // len(rows))
            entries = -(-(limit - len(updates)) // per_entry)  # rounded up
        return updates[:limit]

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "engine": "redis",
            "node": self.node,
            "redis": "connected" if self.link.connected else "disconnected",
            "url": self.description,
            "epoch": self._epoch,
            "resets": self._resets,
        }
        if self._last_reset is not None:
            status["last_reset"] = self._last_reset
        if self._follower is not None:
            status["feed_seq"] = self._follower.seq
        if not self.link.connected:
            status["degraded"] = self.link.reason
        return status


def _forget_call(calls: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        calls.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that was cancelled cannot anymore

    return done
