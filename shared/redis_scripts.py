"""The Lua scripts of inferq's Redis transport (shared/redis_transport.py): each one
atomic step on the broker. Key and argument layouts are documented above each."""

from __future__ import annotations

# Lua: ``now`` in seconds by the server's clock, so hosts' clocks need not agree.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
"""


# KEYS: unacked hash, unacked index, owner hash, consumers, then for each queue (in the
# order to try) its priority lists followed by its wake marker.
# ARGV: now (client clock, as kombu's index uses), owner, delivery tag, lists per queue.
# -> {queue index (0-based), entry, more} or nil; ``more`` is 1 while any of the queues
# still holds a message (fetch again at once), else 0 (wait on the wake markers: a fetch
# that would find nothing is a round trip saved per message at low load). The entry is
# recorded as kombu records an unacked message, ``[message, exchange, routing key]``, with
# the anonymous exchange and the queue as routing key, so a restore puts it back on the
# queue it came from.
FETCH = _NOW + """
local per = tonumber(ARGV[4]) + 1
local nq = (#KEYS - 4) / per
local function len(key)  -- pcall: a key of another type must not abort a fetch midway
  local n = redis.pcall('LLEN', key)
  return type(n) == 'number' and n or 0
end
local function ready(q)
  for p = 1, per - 1 do
    if len(KEYS[4 + q * per + p]) > 0 then return true end
  end
  return false
end
for q = 0, nq - 1 do
  for p = 1, per - 1 do
    local item = redis.call('RPOP', KEYS[4 + q * per + p])
    if item then
      local queue = string.sub(KEYS[4 + q * per + per], string.len(ARGV[5]) + 1)
      redis.call('ZADD', KEYS[2], ARGV[1], ARGV[3])
      redis.call('HSET', KEYS[1], ARGV[3],
                 '[' .. item .. ',"",' .. cjson.encode(queue) .. ']')
      redis.call('HSET', KEYS[3], ARGV[3], ARGV[2])
      redis.call('ZADD', KEYS[4], now, ARGV[2])
      -- whatever is left wakes the next sleeping consumer
      local more = 0
      for r = 0, nq - 1 do
        if ready(r) then
          more = 1
          local wake = KEYS[4 + r * per + per]
          if len(wake) == 0 then
            redis.pcall('LPUSH', wake, '1')
            redis.pcall('PEXPIRE', wake, ARGV[6])
          end
        end
      end
      return {q, item, more}
    end
  end
end
return nil
"""

# KEYS: the queue's list, its wake marker. ARGV: the message, the marker's TTL (ms).
# Only a push onto an empty list wakes anyone: while a list holds messages, an idle
# consumer has either been woken already or will be by the fetch that empties it less.
PUT = """
if redis.call('LPUSH', KEYS[1], ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], '1')
  redis.call('LTRIM', KEYS[2], 0, 0)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
"""

# KEYS: consumers, owner hash, unacked index. ARGV: seconds of silence that mean dead.
# Every message of a dead owner gets index score 0, so the visibility sweep that follows
# restores it at once. -> number of messages marked.
SWEEP_DEAD = _NOW + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
if #dead == 0 then return 0 end
local gone = {}
for _, owner in ipairs(dead) do
  gone[owner] = true
  redis.call('ZREM', KEYS[1], owner)
end
local held = redis.call('HGETALL', KEYS[2])
local marked = 0
for i = 1, #held, 2 do
  if gone[held[i + 1]] and redis.call('ZSCORE', KEYS[3], held[i]) then
    redis.call('ZADD', KEYS[3], 0, held[i])
    marked = marked + 1
  end
end
return marked
"""

# KEYS: consumers. ARGV: owners.
BEAT = _NOW + """
for _, owner in ipairs(ARGV) do redis.call('ZADD', KEYS[1], now, owner) end
"""
