"""The Redis engine: one atomic Lua script per batch, a stream followed with XREAD as the feed.

Every node shares one history kept in Redis, under keys that share one hash tag (so that a
Redis Cluster puts them in one slot)::

    {prefix}:meta        hash: epoch, seq, total (exact int64), pruned (the last seq whose
                         id left the dedup window)
    {prefix}:log         stream, one entry per batch (its applied updates), entry id
                         "<last seq>-0", fields e (epoch), u (JSON, one item per update:
                         [seq, delta, total, at, conn, client, name, req_id]), k (the
                         batch's dedup keys, each as "<seq> <len>:<key>"); an entry of
                         one update with fields e, s, d, t, k, p (older versions) is still
                         read
    {prefix}:ids         hash: dedup key "<len(scope)>:<scope><req_id>" -> "<seq> <total>",
                         for the ids of the last ``window`` updates (``dedup_scope``)
    {prefix}:node:<node> hash: session, counter, reply: this node's last batch and its
                         reply (expires 5 minutes after the node's last batch)

**Batches.** One script per batch checks the epoch, answers duplicates from the ids hash
(one HMGET per batch), adds each delta (in Lua while the total is exact as a double, below
2^53; else with HINCRBY, exact int64; an overflow refuses that add only), appends the batch's
updates to the stream as one entry (so that XADD, each follower's XREAD and its decoding
are paid per batch, not per update), forgets ids that left the window (read back from the
stream entries leaving it) and trims the stream to ``max(keep, window)`` updates or a
little more. A script has no rollback, so nothing in it can fail half-way by design:
errors are caught with ``redis.pcall`` or ruled out before the first write, and the
``#!lua`` shebang makes Redis refuse the whole script up front (instead of one command
half-way) when it is out of memory.

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
the last seq it saw, checks that each entry continues the previous one (same epoch, its
first seq the last one seen + 1)
and hands ``Published`` chunks to the feed. An entry of another epoch, or a seq that skips
entries trimmed away meanwhile, turns into ``Reset``. Entries of a new history at or below
the last id read are invisible to XREAD, so whenever the stream is idle (each block timeout),
after a reconnect and when a batch saw a new epoch, the follower also reads the meta hash.

No redis-py call is ever cancelled in flight (a cancelled call once left a connection handing
out the wrong replies): calls run in their own task behind ``asyncio.shield``, and the
follower is stopped by ``CLIENT UNBLOCK``. redis-py's own retries are off (they would resend
commands across a Redis restart); the batch id makes our own resends safe.

One module per concern, each leaning only on those listed before it:

- ``lua``: the two scripts (open, batch) and their EVALSHA runner;
- ``entries``: key names, a batch's arguments and reply, a stream entry's fields (pure);
- ``link``: clients set up as the engine needs them, and whether Redis answers;
- ``feed``: the follower, the stream turned into ``Published`` and ``Reset`` events;
- ``engine``: ``RedisEngine`` itself, url redaction and the durability check.
"""

from __future__ import annotations

from wstally.engine.redis.engine import RedisEngine, durability_risks, redact_url
from wstally.engine.redis.entries import entry_rows, history_keys

__all__ = ["RedisEngine", "durability_risks", "entry_rows", "history_keys", "redact_url"]
