"""The Redis engine: one atomic Lua script per batch, a stream followed with XREAD as the feed.

Every node shares one history kept in Redis, under keys that share one hash tag (so that a
Redis Cluster puts them in one slot)::

    {prefix}:meta        hash: epoch, seq, total (kept by HINCRBY: exact int64, refuses
                         overflow), pruned (the last seq whose id left the dedup window)
    {prefix}:log         stream, one entry per applied update, entry id "<seq>-0", fields
                         e (epoch), s (seq), d (delta), t (total), k (the dedup key, "" for
                         an add without id), p (JSON [at, conn, client, name, req_id]);
                         every entry has the same fields, whose names Redis then stores
                         once per stream node
    {prefix}:ids         hash: dedup key "<len(scope)>:<scope><req_id>" -> "<seq> <total>",
                         for the ids of the last ``window`` updates (``dedup_scope``)
    {prefix}:node:<node> hash: session, counter, reply: this node's last batch and its
                         reply (expires 5 minutes after the node's last batch)

**Batches.** One script per batch checks the epoch, answers duplicates from the ids hash,
adds each delta with HINCRBY (an overflow refuses that add only), appends the update to the
stream, forgets ids that left the window (read back from the stream entries leaving it) and
trims the stream to ``max(keep, window)`` updates or a little more. A script has no rollback,
so nothing in it can fail half-way by design: errors are caught with ``redis.pcall`` or ruled
out before the first write, and the ``#!lua`` shebang makes Redis refuse the whole script up
front (instead of one command half-way) when it is out of memory.

**Unknown outcomes.** Each batch carries an id (a random session token of this engine
instance and a counter). A batch whose reply was lost (connection dropped, timeout, Redis
restarted) is resent with the same id until ``unavailable_after`` seconds have passed; the
script answers a batch id it has already run with the stored reply instead of applying the
batch again, so even id-less adds are applied once. Submissions are serialised, so only the
last batch of a node can ever be resent: one reply per node is kept, which bounds the memory
to the number of nodes; and a copy of an older batch arriving late (held up in the network
while its resend went through) is recognised by its counter and never applied. After
``unavailable_after`` the batch fails with a transient ``EngineError``: its outcome is
unknown and clients resend with their ids.

**New history.** A missing meta hash means Redis lost its data (or this is the first start):
whoever notices first (a batch, ``open()`` or the feed) starts a new epoch and drops what an
older history left. A batch that meets an epoch other than the one this engine announced is
*not* applied: it fails with a transient ``EngineError`` (``unavailable``), and the feed is
woken to read the new position. The feed yields ``Reset`` for the new epoch, and only once
the feed's consumer has taken that ``Reset`` do batches apply to the new history (with no
feed running, the next batch does): an ack never refers to a history the hub has not seen.

**Feed.** A follower task on its own connection reads the stream with ``XREAD BLOCK`` from
the last seq it saw, checks that each entry continues the previous one (same epoch, seq + 1)
and hands ``Published`` chunks to the feed. An entry of another epoch, or a seq that skips
entries trimmed away meanwhile, turns into ``Reset``. Entries of a new history at or below
the last id read are invisible to XREAD, so whenever the stream is idle (each block timeout),
after a reconnect and when a batch saw a new epoch, the follower also reads the meta hash.

No redis-py call is ever cancelled in flight (a cancelled call once left a connection handing
out the wrong replies): calls run in their own task behind ``asyncio.shield``, and the
follower is stopped by ``CLIENT UNBLOCK``. redis-py's own retries are off (they would resend
commands across a Redis restart); the batch id makes our own resends safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

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
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from wstally.engine.base import (
    EngineError,
    FeedEvent,
    Position,
    Published,
    Reset,
    Result,
    Submission,
)
from wstally.logsetup import get_logger
from wstally.store.base import ROW_COLUMNS, new_epoch
from wstally.tally import DEDUP_WINDOW, Duplicate, Refused, Update, dedup_scope

__all__ = ["RedisEngine", "durability_risks", "entry_row", "history_keys", "redact_url"]

T = TypeVar("T")

# Shared by both scripts. KEYS[1] meta hash, KEYS[2] log stream, KEYS[3] ids hash.
_LUA_COMMON = """
local meta, log, ids = KEYS[1], KEYS[2], KEYS[3]

-- No meta hash: a new history (first start, or Redis lost its data). Start it under the
-- candidate epoch and drop whatever an older history left, so that its entries and ids
-- cannot leak into the new one.
local function current_epoch(candidate)
  local epoch = redis.call('HGET', meta, 'epoch')
  if epoch then return epoch end
  redis.call('DEL', log, ids)
  redis.call('HSET', meta, 'epoch', candidate, 'seq', '0', 'total', '0', 'pruned', '0')
  return candidate
end
"""

# ARGV[1]: a candidate epoch. Returns {epoch, seq, total} as strings.
_OPEN_LUA = (
    "#!lua\n"
    + _LUA_COMMON
    + """
local epoch = current_epoch(ARGV[1])
local state = redis.call('HMGET', meta, 'seq', 'total')
return {epoch, state[1], state[2]}
"""
)

# KEYS[4]: this node's hash (last batch and reply). ARGV: 1 expected epoch, 2 candidate
# epoch, 3 window, 4 keep, 5 seconds to keep the reply, 6 session, 7 batch counter, then 3
# per add: delta, dedup key ("" without an id), payload (JSON: at, conn, client, name, req_id).
# Returns one string: "ok <epoch> <seq> <total>" then per add "u <seq> <total>" (applied),
# "d <seq> <total>" (duplicate), "o" (overflow) or "b" (bad delta); or, with nothing
# applied, "epoch <epoch> <seq> <total>" when Redis holds another history, "stale" for a
# batch older than this session's last one.
_BATCH_LUA = (
    "#!lua\n"
    + _LUA_COMMON
    + """
local node, session, counter = KEYS[4], ARGV[6], tonumber(ARGV[7])
local EXACT = 9007199254740992  -- 2^53: Lua numbers are doubles, exact below this

-- HINCRBY's reply became a double: below 2^53 it is exact, above read the string back.
local function exact_total(n)
  if n > -EXACT and n < EXACT then return string.format('%d', n) end
  return redis.call('HGET', meta, 'total')
end

-- Forget the ids of updates that left the window, read from their stream entries; at most
-- `budget` updates per batch so that a smaller window never makes one script long.
local function forget(seq, window, pruned, budget)
  local horizon = math.min(seq - window, pruned + budget)
  if horizon <= pruned then return pruned end
  local rows = redis.call('XRANGE', log, string.format('%d', pruned + 1),
                          string.format('%d', horizon))
  local dead = {}
  for _, row in ipairs(rows) do
    local key = row[2][10]
    if key ~= '' then
      dead[#dead + 1] = key
      if #dead == 1000 then redis.call('HDEL', ids, unpack(dead)); dead = {} end
    end
  end
  if #dead > 0 then redis.call('HDEL', ids, unpack(dead)) end
  redis.call('HSET', meta, 'pruned', string.format('%d', horizon))
  return horizon
end

local last = redis.call('HMGET', node, 'session', 'counter', 'reply')
if last[1] == session then
  if tonumber(last[2]) == counter then return last[3] end
  if tonumber(last[2]) > counter then return 'stale' end
end

local epoch = current_epoch(ARGV[2])
local state = redis.call('HMGET', meta, 'seq', 'total', 'pruned')
if epoch ~= ARGV[1] then
  return 'epoch ' .. epoch .. ' ' .. state[1] .. ' ' .. state[2]
end
local seq = tonumber(state[1])
local first = seq
if seq + (#ARGV - 7) / 3 >= EXACT then
  return redis.error_reply('seq would pass 2^53, beyond what this script counts exactly')
end

local out = {}
for a = 8, #ARGV, 3 do
  local delta, key = ARGV[a], ARGV[a + 1]
  local seen = false
  if key ~= '' then seen = redis.call('HGET', ids, key) end
  if seen then
    out[#out + 1] = 'd ' .. seen
  else
    -- HINCRBY refuses without writing: an overflowing total, or a delta that is no int64.
    local total = redis.pcall('HINCRBY', meta, 'total', delta)
    if type(total) == 'table' then
      if string.find(total.err, 'overflow', 1, true) then out[#out + 1] = 'o'
      else out[#out + 1] = 'b' end
    else
      seq = seq + 1
      local s, t = string.format('%d', seq), exact_total(total)
      redis.call('XADD', log, s .. '-0', 'e', epoch, 's', s, 'd', delta, 't', t,
                 'k', key, 'p', ARGV[a + 2])
      if key ~= '' then redis.call('HSET', ids, key, s .. ' ' .. t) end
      out[#out + 1] = 'u ' .. s .. ' ' .. t
    end
  end
end

if seq > first then
  redis.call('HSET', meta, 'seq', string.format('%d', seq))
  local pruned = forget(seq, tonumber(ARGV[3]), tonumber(state[3] or '0'), 2 * (seq - first) + 100)
  -- Keep `keep` updates, and every update whose id is still remembered (forget reads them).
  local minid = math.min(seq - tonumber(ARGV[4]), pruned) + 1
  if minid > 1 then redis.call('XTRIM', log, 'MINID', '~', string.format('%d', minid)) end
end

local reply = 'ok ' .. epoch .. ' ' .. string.format('%d', seq) .. ' '
  .. redis.call('HGET', meta, 'total')
if #out > 0 then reply = reply .. ' ' .. table.concat(out, ' ') end
redis.call('HSET', node, 'session', session, 'counter', ARGV[7], 'reply', reply)
redis.call('EXPIRE', node, ARGV[5])
return reply
"""
)

# One XREAD or XRANGE returns at most this many entries: ~1 ms of Redis time each.
_CHUNK = 1000
# The follower's XREAD blocks this long, then reads the meta hash (and sees a new epoch
# whose entries XREAD cannot show). Well below the follower's socket timeout.
_BLOCK_MS = 1000
# A node's last reply outlives any resend of its batch (bounded by unavailable_after) by far.
_REPLY_TTL = 300
_EVENTS_QUEUED = 64

# Redis errors that go away by themselves: resending later may work.
_TRANSIENT = ("OOM", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "NOREPLICAS", "CLUSTERDOWN")

# A stream entry's payload: [at, conn, client, name, req_id] (null for None). JSON keeps
# None apart from "", floats exact (repr), and packs five fields into one for Redis.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# The C scanner alone: decode() would also run a regex for surrounding whitespace, twice
# the cost, on every entry of every feed.
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]

_Lost = (RedisConnectionError, RedisTimeoutError)


def history_keys(prefix: str) -> tuple[str, str, str]:
    """The meta hash, the log stream and the ids hash of the history kept under ``prefix``."""
    # One hash tag for every key: Redis Cluster puts the keys of one script in one slot.
    tag = "{" + prefix + "}"
    return f"{tag}:meta", f"{tag}:log", f"{tag}:ids"


# An entry's s, d and t and then its payload hold an update's fields in this order.
_UPDATE_FIELDS = tuple(field.name for field in dataclasses.fields(Update))
_INTEGER = re.compile(r"-?[0-9]+")


def entry_row(fields: Sequence[str]) -> tuple[str | None, tuple[Any, ...]]:
    """A stream entry's epoch and its update as a stored row (``store.ROW_COLUMNS``).

    Read by field name and without trusting the values, unlike the feed's decoding: a number
    that is not one stays text, a missing field or payload item is None. ``wstally history
    --verify`` can then name what is wrong with an entry instead of failing on it.
    """
    named = dict(zip(fields[::2], fields[1::2], strict=False))
    try:
        payload = json.loads(named.get("p", ""))
    except ValueError:
        payload = None
    if not isinstance(payload, list) or len(payload) != len(_UPDATE_FIELDS) - 3:
        payload = [None] * (len(_UPDATE_FIELDS) - 3)
    numbers = [_stored_int(named.get(name)) for name in ("s", "d", "t")]
    values = dict(zip(_UPDATE_FIELDS, (*numbers, *payload), strict=True))
    return named.get("e"), tuple(values[column] for column in ROW_COLUMNS)


def _stored_int(text: str | None) -> int | str | None:
    # The script writes integers as %d: anything else is kept as found, for the report.
    return int(text) if text is not None and _INTEGER.fullmatch(text) else text


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


def _default_node() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Script:
    """A Lua script run by EVALSHA, sent whole again when Redis lost it (after a restart)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run(self, client: Redis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            # Nothing ran: sending the source is safe, and caches the script again.
            return await client.eval(self.source, len(keys), *keys, *args)


class _Link:
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


def _decode(f: Sequence[str]) -> Update:
    """An update from a stream entry's field list (fields in the order the script wrote)."""
    at, conn, client, name, req_id = _scan(f[11], 0)[0]
    return Update(int(f[3]), int(f[5]), int(f[7]), at, conn, client, name, req_id)


def _encode(batch: Sequence[Submission]) -> list[Any]:
    args: list[Any] = []
    for s in batch:
        key = "" if s.req_id is None else _id_key(dedup_scope(s.client, s.conn), s.req_id)
        args += (s.delta, key, _dumps([s.at, s.conn, s.client, s.name, s.req_id]))
    return args


def _id_key(scope: str, req_id: str) -> str:
    # The length prefix keeps (scope, id) pairs apart whatever characters they hold.
    return f"{len(scope)}:{scope}{req_id}"


def _results(batch: Sequence[Submission], tokens: list[str]) -> list[Result]:
    results: list[Result] = []
    i = 4
    for s in batch:
        kind = tokens[i]
        if kind == "u":
            seq, total = int(tokens[i + 1]), int(tokens[i + 2])
            results.append(Update(seq, s.delta, total, s.at, s.conn, s.client, s.name, s.req_id))
            i += 3
        elif kind == "d":
            assert s.req_id is not None
            results.append(Duplicate(s.req_id, int(tokens[i + 1]), int(tokens[i + 2])))
            i += 3
        else:
            results.append(_refusal(kind, s.delta))
            i += 1
    return results


def _refusal(kind: str, delta: int) -> Refused:
    if kind == "o":
        return Refused(
            "overflow",
            f"adding {delta} would take the total out of the signed 64-bit range; total unchanged",
        )
    return Refused("bad_delta", "delta must be in the signed 64-bit range")


def _store_failed(exc: RedisError) -> EngineError:
    """An error Redis answered (or a reply redis-py could not read): retrying in the engine
    would not help; some of them pass with time (out of memory, a replica promoted)."""
    message = str(exc)
    transient = not isinstance(exc, ResponseError) or message.startswith(_TRANSIENT)
    return EngineError("store_failed", f"Redis refused: {message}", transient=transient)


class _Follower:
    """Reads the stream from the last seq seen and queues feed events, reconnecting alone."""

    def __init__(self, engine: RedisEngine, client: Redis, start: Position) -> None:
        self._engine = engine
        self._client = client
        self.epoch, self.seq, self.total = start.epoch, start.seq, start.total
        # None ends the feed; an exception ends it with that error.
        self.queue: asyncio.Queue[FeedEvent | BaseException | None] = asyncio.Queue(_EVENTS_QUEUED)
        self.stopping = asyncio.Event()
        self.blocked = False  # inside XREAD BLOCK: CLIENT UNBLOCK wakes it
        self.client_id: int | None = None
        self._check = True

    async def run(self) -> None:
        try:
            await self._follow()
        except Exception as exc:
            # A bug, not Redis: end the feed with it rather than leave it silent forever.
            _make_room(self.queue)
            self.queue.put_nowait(exc)
            raise

    async def _follow(self) -> None:
        delay = 0.05
        while not self.stopping.is_set():
            try:
                await self._step()
                delay = 0.05
            except _Lost as exc:
                self._engine.link.down(exc)
                await self._pause(delay)
                delay = min(delay * 2, 1.0)
            except RedisError as exc:
                # Not a lost connection (a key of the wrong type, a script error): keep
                # trying, loudly, rather than let the feed end in silence.
                get_logger("wstally.engine").error("engine.feed_failed", error=str(exc))
                await self._pause(1.0)

    async def _pause(self, delay: float) -> None:
        # A reconnection needs the id of the new connection and a fresh look at the meta.
        self.client_id = None
        self._check = True
        with contextlib.suppress(TimeoutError):  # cut short by close()
            await asyncio.wait_for(self.stopping.wait(), delay)

    def nudge(self) -> None:
        """Read the meta hash before the next XREAD (a batch saw another epoch)."""
        self._check = True

    async def _step(self) -> None:
        if self.client_id is None:
            self.client_id = int(await self._client.client_id())
        if self._check:
            await self._check_position()
            self._check = False
        log_key = self._engine.keys[1]
        self.blocked = True
        try:
            read = self._client.xread({log_key: f"{self.seq}-0"}, count=_CHUNK, block=_BLOCK_MS)
            reply: Any = await read
        finally:
            self.blocked = False
        self._engine.link.up()
        if not reply:
            self._check = True
            return
        await self._publish(reply[0][1])

    async def _check_position(self) -> None:
        epoch, seq, total = await self._engine._read_position(self._client)
        if epoch != self.epoch:
            await self._reset(Position(epoch, seq, total), "Redis holds a new history")
        elif seq < self.seq:
            await self._reset(Position(epoch, seq, total), "Redis lost committed updates")

    async def _publish(self, entries: list[Any]) -> None:
        updates: list[Update] = []
        for _id, f in entries:
            seq = int(f[3])
            if f[1] != self.epoch or seq != self.seq + 1:
                if updates:
                    await self._emit(Published(updates))
                    updates = []
                before = Position(f[1], seq - 1, int(f[7]) - int(f[5]))
                reason = (
                    "Redis holds a new history"
                    if f[1] != self.epoch
                    else f"updates {self.seq + 1} to {seq - 1} are no longer kept"
                )
                await self._reset(before, reason)
            update = _decode(f)
            updates.append(update)
            self.seq, self.total = update.seq, update.total
        if updates:
            await self._emit(Published(updates))

    async def _reset(self, position: Position, reason: str) -> None:
        self.epoch, self.seq, self.total = position.epoch, position.seq, position.total
        await self._emit(Reset(position, reason))

    async def _emit(self, event: FeedEvent) -> None:
        await self.queue.put(event)


class RedisEngine:
    """The engine seam over Redis (7.0 or later); see the module docstring for the layout."""

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
        self._open_script = _Script(_OPEN_LUA)
        self._batch_script = _Script(_BATCH_LUA)
        self.link = _Link(self.description)
        self._redis: Redis | None = None
        self._position: Position | None = None
        self._epoch = ""  # the history batches apply to: the last one the feed announced
        self._resets = 0
        self._last_reset: str | None = None
        self._submitting = asyncio.Lock()
        self._calls: set[asyncio.Task[Any]] = set()
        self._follower: _Follower | None = None
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
        options: dict[str, Any] = dict(parse_url(self.url))
        # Ours win over the URL's query (redis-py's from_url lets the URL win): the engine
        # relies on each of these.
        options.update(
            max_connections=connections,
            timeout=self.unavailable_after,  # waiting for a free connection
            socket_timeout=socket_timeout,
            socket_connect_timeout=min(1.0, self.unavailable_after),
            # Off: redis-py would resend a command across a restart on its own.
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
            # RESP2 pinned: the stream replies below are decoded by shape, and redis-py 8
            # changed its default to RESP3 (where XREAD answers a map).
            protocol=2,
            client_name=f"wstally:{self.node}",
        )
        if _hiredis_pack is not None:
            kind = options.get("connection_class", Connection)
            options["connection_class"] = _PACKED.get(kind, kind)
        client = Redis(connection_pool=BlockingConnectionPool(**options))
        # Stream replies stay nested lists: the fields are decoded by position, in one pass.
        client.set_response_callback("XRANGE", _raw)
        client.set_response_callback("XREAD", _raw)
        return client

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
        reply = await self._shielded(self._run_batch(_encode(batch)))
        tokens = reply.split(" ")
        if tokens[0] == "epoch":
            raise await self._new_history(tokens[1])
        if tokens[0] == "stale":  # cannot happen while batches are serialised
            raise EngineError("store_failed", "batch overtaken by a later one", transient=True)
        return _results(batch, tokens)

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
            except _Lost as exc:
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
            socket_timeout=_BLOCK_MS / 1000 + self.unavailable_after, connections=1
        )
        self._follower = _Follower(self, self._follower_client, self._position)
        return self._deliver(self._follower)

    async def _deliver(self, follower: _Follower) -> AsyncIterator[FeedEvent]:
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
            deadline = time.monotonic() + _BLOCK_MS / 1000 + self.unavailable_after
            while not task.done() and time.monotonic() < deadline:
                if follower.blocked:
                    await self._unblock(follower)
                await asyncio.wait({task}, timeout=0.05)
            if not task.done():
                # Redis hangs: the follower's connection is discarded with its pool below,
                # so a cancelled call cannot hand a stale reply to anyone.
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        _make_room(follower.queue)
        follower.queue.put_nowait(None)

    async def _unblock(self, follower: _Follower) -> None:
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
        while len(updates) < limit:
            count = min(_CHUNK, limit - len(updates))

            async def chunk(start: int = start, count: int = count) -> Any:
                return await redis.xrange(self.keys[1], str(start), "+", count)

            rows = await self._retrying(chunk)
            for _id, f in rows:
                if f[1] != self._epoch:
                    return updates  # a history the feed has not announced yet
                updates.append(_decode(f))
            if len(rows) < count:
                break
            start = updates[-1].seq + 1
        return updates

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


def _raw(response: Any, **_options: Any) -> Any:
    return response


def _forget_call(calls: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        calls.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that was cancelled cannot anymore

    return done


def _make_room(queue: asyncio.Queue[Any]) -> None:
    # Closing: the events nobody read no longer matter, the end-of-feed marker does.
    while queue.full():
        queue.get_nowait()
