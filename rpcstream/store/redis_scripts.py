"""The Lua scripts of :class:`~rpcstream.store.redis.RedisStore`.

Redis runs one script at a time, so each is one atomic step: what it checks
still holds when it writes. Their keys and arguments are listed above each;
the module docstring of :mod:`rpcstream.store.redis` says what the keys hold.
"""

from __future__ import annotations

__all__ = ["APPEND", "CREATE", "FETCH", "FIELDS", "RENEW", "SWEEP"]

# KEYS: run, tombstone, leases. ARGV: flow, created, has_owner ("1"/"0"), owner,
# lease deadline ("": no lease), run id.
# Returns 1 created, 0 the run exists, 2 its tombstone does (it expired).
CREATE = """
if redis.call('EXISTS', KEYS[1]) > 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) > 0 then return 2 end
redis.call('HSET', KEYS[1], 'flow', ARGV[1], 'status', 'running', 'created', ARGV[2],
           'last_id', 0, 'first_id', 1)
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'owner', ARGV[4]) end
if ARGV[5] ~= '' then redis.call('ZADD', KEYS[3], ARGV[5], ARGV[6]) end
return 1
"""

# KEYS: leases, then the run hash of each run. ARGV: the new deadline, then each run id.
# Returns the ids of the runs no longer running (their leases are dropped).
RENEW = """
local gone = {}
for i = 2, #KEYS do
  if redis.call('HGET', KEYS[i], 'status') == 'running' then
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
  else
    redis.call('ZREM', KEYS[1], ARGV[i])
    gone[#gone + 1] = ARGV[i]
  end
end
return gone
"""

# KEYS: run, stream, tombstone, expiring, leases.
# ARGV: 1 type, 2 data, 3 now (the timestamp), 4 terminal ("1"/"0"), 5 max_events (0: none),
#       6 expires, 7 run TTL ms, 8 tombstone TTL ms, 9 run id, 10 channel, 11 message header,
#       12 "1": append only if the run's lease lapsed (checked and appended in one step).
# Returns {0, id}, or {1} not found, {2} expired, {3} finished, {4} lease held.
APPEND = """
local state = redis.call('HMGET', KEYS[1], 'status', 'expires')
if not state[1] then return {1 + redis.call('EXISTS', KEYS[3])} end
if state[2] and tonumber(state[2]) <= tonumber(ARGV[3]) then return {2} end
if state[1] ~= 'running' then return {3} end
if ARGV[12] == '1' then
  local deadline = redis.call('ZSCORE', KEYS[5], ARGV[9])
  if not deadline or tonumber(deadline) > tonumber(ARGV[3]) then return {4} end
end
local id = redis.call('HINCRBY', KEYS[1], 'last_id', 1)
local max = tonumber(ARGV[5])
if max > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '=', max, id .. '-0',
             't', ARGV[1], 'd', ARGV[2], 'ts', ARGV[3])
  if id - max + 1 > 1 then redis.call('HSET', KEYS[1], 'first_id', id - max + 1) end
else
  redis.call('XADD', KEYS[2], id .. '-0', 't', ARGV[1], 'd', ARGV[2], 'ts', ARGV[3])
end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished', ARGV[3], 'expires', ARGV[6])
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[8])
  redis.call('ZADD', KEYS[4], ARGV[6], ARGV[9])
  redis.call('ZREM', KEYS[5], ARGV[9])
end
redis.call('PUBLISH', ARGV[10], id .. ' ' .. ARGV[11] .. ARGV[1] .. ARGV[2])
return {0, id}
"""

# KEYS: run, stream, tombstone. ARGV: first entry id to read, count (0: metadata only).
# Returns {0, fields, entries}, or {1} not found, {2} expired.
FIELDS = ("flow", "owner", "status", "created", "finished", "expires", "last_id", "first_id")
FETCH = f"""
local f = redis.call('HMGET', KEYS[1], {", ".join(repr(name) for name in FIELDS)})
if not f[1] then return {{1 + redis.call('EXISTS', KEYS[3])}} end
-- Events stored but the stream gone: retention removed it just before the hash.
if tonumber(f[7]) >= tonumber(f[8]) and redis.call('EXISTS', KEYS[2]) == 0 then return {{2}} end
local entries = {{}}
if ARGV[2] ~= '0' then
  entries = redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2])
end
return {{0, f, entries}}
"""

# KEYS: run, stream, tombstone, expiring. ARGV: now, run id, tombstone TTL ms.
# Returns 1 when it removed the run, 0 when Redis had expired it already.
SWEEP = """
local expires = redis.call('HGET', KEYS[1], 'expires')
local removed = 0
if expires then
  if tonumber(expires) > tonumber(ARGV[1]) then return 0 end
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
  removed = 1
end
redis.call('ZREM', KEYS[4], ARGV[2])
return removed
"""
