"""The engine's two Lua scripts, and the runner that sends them to Redis.

``OPEN_LUA`` reads the position (starting a new history when there is none); ``BATCH_LUA``
applies one batch atomically. The package docstring tells which keys they keep and why
nothing in a script can fail half-way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

__all__ = ["BATCH_LUA", "OPEN_LUA", "Script"]

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
OPEN_LUA = (
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
# Returns one string: "ok <epoch> <seq> <total>" as they were before the batch, then per
# add "u" (applied: the next seq, the total plus its delta), "d <seq> <total>"
# (duplicate), "o" (overflow) or "b" (bad delta); or, with nothing
# applied, "epoch <epoch> <seq> <total>" when Redis holds another history, "stale" for a
# batch older than this session's last one.
BATCH_LUA = (
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

-- Adds to `dead` the dedup keys an entry holds for the seqs in (from, to]. A batch entry
-- packs them as "<seq> <len>:<key>" one after the other (any character may occur in a
-- key); an entry of one update (as older versions wrote) has its seq in s, its key in k.
local function entry_keys(f, from, to, dead)
  if f[3] ~= 'u' then
    local s = tonumber(f[4])
    if f[10] and f[10] ~= '' and s and s > from and s <= to then dead[#dead + 1] = f[10] end
    return
  end
  local packed, pos = f[6] or '', 1
  while pos <= #packed do
    local space = string.find(packed, ' ', pos, true)
    local colon = space and string.find(packed, ':', space, true)
    local s = colon and tonumber(string.sub(packed, pos, space - 1))
    local n = colon and tonumber(string.sub(packed, space + 1, colon - 1))
    if not s or not n or n < 1 then return end  -- not written by this script: never loop on it
    if s > from and s <= to then dead[#dead + 1] = string.sub(packed, colon + 1, colon + n) end
    pos = colon + n + 1
  end
end

-- Forget the ids of updates that left the window, read from their stream entries; at most
-- `budget` updates per batch so that a smaller window never makes one script long. An entry
-- is stored under its last seq, so the one after the horizon may begin before it: its keys
-- up to the horizon go now (the window is exact), the rest with a later batch.
local function forget(seq, window, pruned, budget)
  local horizon = math.min(seq - window, pruned + budget)
  if horizon <= pruned then return pruned end
  local rows = redis.call('XRANGE', log, string.format('%d', pruned + 1),
                          string.format('%d', horizon))
  local straddling = redis.call('XRANGE', log, string.format('%d', horizon + 1), '+', 'COUNT', 1)
  if straddling[1] then rows[#rows + 1] = straddling[1] end
  local dead = {}
  for _, row in ipairs(rows) do
    entry_keys(row[2], pruned, horizon, dead)
    if #dead >= 1000 then redis.call('HDEL', ids, unpack(dead)); dead = {} end
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

-- The ids of the whole batch in one HMGET (a redis.call costs more than its command: each
-- is converted, dispatched and, when it writes, appended to the AOF on its own).
local found, wanted = {}, {}
local function look_up()
  local values = redis.call('HMGET', ids, unpack(wanted))
  for i, key in ipairs(wanted) do found[key] = values[i] end
  wanted = {}
end
for a = 9, #ARGV, 3 do
  if ARGV[a] ~= '' then
    wanted[#wanted + 1] = ARGV[a]
    if #wanted == 1000 then look_up() end  -- unpack() is bounded by Lua's C stack
  end
end
if #wanted > 0 then look_up() end

-- The total is added in Lua while it is exact there (a double below 2^53) and written back
-- once; any other delta goes through HINCRBY, which refuses an overflow or a delta that
-- is no int64 without writing. A delta taken in Lua must be written as Redis's own
-- string2ll would accept it (no sign, no leading zero), which also makes it valid JSON.
local total = state[2]
local sum = tonumber(total)
local exact = math.abs(sum) < EXACT
local written = true  -- whether the meta hash holds `total`
local function add_slow(delta)
  if not written then redis.call('HSET', meta, 'total', total); written = true end
  local result = redis.pcall('HINCRBY', meta, 'total', delta)
  if type(result) == 'table' then
    if string.find(result.err, 'overflow', 1, true) then return 'o' end
    return 'b'
  end
  total = exact_total(result)
  sum = tonumber(total)
  exact = math.abs(sum) < EXACT
  return nil
end

local out, items, keys, packed, fresh = {}, {}, {}, {}, {}
for a = 8, #ARGV, 3 do
  local delta, key = ARGV[a], ARGV[a + 1]
  local seen = false
  if key ~= '' then seen = fresh[key] or found[key] end
  if seen then
    out[#out + 1] = 'd ' .. seen
  else
    local refused = nil
    local n = tonumber(delta)
    if exact and n and math.abs(n) < 1e15 and math.abs(sum + n) < EXACT
        and (delta == '0' or string.find(delta, '^%-?[1-9]%d*$')) then
      sum = sum + n
      total = string.format('%d', sum)
      written = false
    else
      refused = add_slow(delta)
    end
    if refused then
      out[#out + 1] = refused
    else
      seq = seq + 1
      local s = string.format('%d', seq)
      -- [seq, delta, total, at, conn, client, name, req_id]: the payload is a JSON array
      -- of the last five, so its "[" gives way to the first three.
      items[#items + 1] = '[' .. s .. ',' .. delta .. ',' .. total .. ','
        .. string.sub(ARGV[a + 2], 2)
      if key ~= '' then
        fresh[key] = s .. ' ' .. total
        keys[#keys + 1] = key
        packed[#packed + 1] = s .. ' ' .. #key .. ':' .. key
      end
      out[#out + 1] = 'u'  -- the node counts the seq and the total, from the header
    end
  end
end

if seq > first then
  local s = string.format('%d', seq)
  -- One entry per batch, under its last seq: XADD, every follower's XREAD and its decoding
  -- are paid once per batch instead of once per update. Written first: should XADD refuse
  -- (a stream tampered with past the meta's seq), the batch has changed nothing else,
  -- unless one of its deltas needed HINCRBY.
  redis.call('XADD', log, s .. '-0', 'e', epoch, 'u', '[' .. table.concat(items, ',') .. ']',
             'k', table.concat(packed))
  redis.call('HSET', meta, 'seq', s, 'total', total)
  local kv = {}
  for _, key in ipairs(keys) do
    kv[#kv + 1] = key
    kv[#kv + 1] = fresh[key]
    if #kv == 1000 then redis.call('HSET', ids, unpack(kv)); kv = {} end
  end
  if #kv > 0 then redis.call('HSET', ids, unpack(kv)) end
  local pruned = forget(seq, tonumber(ARGV[3]), tonumber(state[3] or '0'), 2 * (seq - first) + 100)
  -- Keep `keep` updates, and every update whose id is still remembered (forget reads them).
  local minid = math.min(seq - tonumber(ARGV[4]), pruned) + 1
  if minid > 1 then redis.call('XTRIM', log, 'MINID', '~', string.format('%d', minid)) end
end

local reply = 'ok ' .. epoch .. ' ' .. state[1] .. ' ' .. state[2]
if #out > 0 then reply = reply .. ' ' .. table.concat(out, ' ') end
redis.call('HSET', node, 'session', session, 'counter', ARGV[7], 'reply', reply)
redis.call('EXPIRE', node, ARGV[5])
return reply
"""
)


class Script:
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
