"""The Lua scripts of :class:`~rpcstream.store.redis.RedisStore`, and their wire formats.

Redis runs one script at a time, so each is one atomic step: what it checks
still holds when it writes. Their keys and arguments are listed above each;
the module docstring of :mod:`rpcstream.store.redis` says what the keys hold.
"""

from __future__ import annotations

from typing import Any

from .base import RunInfo, StoredEvent

__all__ = [
    "APPEND",
    "pack_append",
    "pack_array",
    "pack_str",
    "parse_fetch",
    "CREATE",
    "FETCH",
    "FIELDS",
    "RENEW",
    "SWEEP",
]

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

# Appends, any number of them, to any runs, in ONE script: a group commit is one
# round trip and one script run, whatever its size. The appends travel as ONE
# msgpack argument and the replies come back as one msgpack string: the client
# encodes and parses one command, however many appends it holds. Key names are
# built here from the prefix (as for every script of this store: not for Cluster).
# ARGV: 1 prefix, 2 max_events (0: none), 3 run TTL ms, 4 tombstone TTL ms,
#       5 msgpack array of appends, each [run id, type, data, now, flag, expires]:
#         now and expires as the client's repr() of the float (expires "" if none);
#         flag "0" an event, "1" a terminal event, "2" a terminal event appended
#         only if the run's lease lapsed (checked and appended in one step).
# Returns a msgpack array, one reply per append: its id (> 0), or -1 not found,
# -2 expired, -3 finished, -4 lease held, or Redis's error message (a string: that
# append failed alone, under pcall).
APPEND = """
local prefix, max, max_arg = ARGV[1], tonumber(ARGV[2]), ARGV[2]
local run_ttl, tombstone_ttl = ARGV[3], ARGV[4]
local expiring, leases = prefix .. 'expiring', prefix .. 'leases'
-- Numbers become strings with %d, never by concatenation or as redis.call
-- arguments: Lua formats those as floats ('%.14g'), which cost Redis more than
-- any command of an append.
local format = string.format
local typed = {}  -- "<len(type)> <type>" per event type, made once per call
local function append(e)
  local run_id, type, data, now, flag, expires = e[1], e[2], e[3], e[4], e[5], e[6]
  local run = prefix .. 'run:' .. run_id
  local stream = prefix .. 'client:' .. run_id
  local tombstone = prefix .. 'expired:' .. run_id
  local state = redis.call('HMGET', run, 'status', 'expires')
  if not state[1] then return -1 - redis.call('EXISTS', tombstone) end
  if state[2] and tonumber(state[2]) <= tonumber(now) then return -2 end
  if state[1] ~= 'running' then return -3 end
  if flag == '2' then
    local deadline = redis.call('ZSCORE', leases, run_id)
    if not deadline or tonumber(deadline) > tonumber(now) then return -4 end
  end
  local id = redis.call('HINCRBY', run, 'last_id', '1')
  local id_text = format('%d', id)
  if max > 0 then
    redis.call('XADD', stream, 'MAXLEN', '=', max_arg, id_text .. '-0',
               't', type, 'd', data, 'ts', now)
    if id - max + 1 > 1 then redis.call('HSET', run, 'first_id', format('%d', id - max + 1)) end
  else
    redis.call('XADD', stream, id_text .. '-0', 't', type, 'd', data, 'ts', now)
  end
  if flag ~= '0' then
    redis.call('HSET', run, 'status', type, 'finished', now, 'expires', expires)
    redis.call('PEXPIRE', run, run_ttl)
    redis.call('PEXPIRE', stream, run_ttl)
    redis.call('SET', tombstone, '1', 'PX', tombstone_ttl)
    redis.call('ZADD', expiring, expires, run_id)
    redis.call('ZREM', leases, run_id)
  end
  -- The message: "<id> <timestamp> <expires or -> <len(type)> <type><data>".
  local type_text = typed[type]
  if not type_text then
    type_text = format('%d', #type) .. ' ' .. type
    typed[type] = type_text
  end
  local header = id_text .. ' ' .. now .. ' ' .. (flag == '0' and '-' or expires)
  redis.call('PUBLISH', prefix .. 'events:' .. run_id, header .. ' ' .. type_text .. data)
  return id
end
local replies = {}
for i, e in ipairs(cmsgpack.unpack(ARGV[5])) do
  local ok, reply = pcall(append, e)
  if not ok then reply = type(reply) == 'table' and reply.err or tostring(reply) end
  replies[i] = reply
end
return cmsgpack.pack(replies)
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


# The appends travel as msgpack that Redis's Lua cmsgpack reads: it knows no bin
# type, so bytes go as msgpack str (cmsgpack does not check UTF-8; stores never
# decode event data).
def pack_str(value: bytes) -> bytes:
    size = len(value)
    if size < 32:
        return bytes((0xA0 | size,)) + value
    if size < 0x100:
        return b"\xd9" + bytes((size,)) + value
    if size < 0x10000:
        return b"\xda" + size.to_bytes(2, "big") + value
    return b"\xdb" + size.to_bytes(4, "big") + value


def pack_append(
    run_id: bytes, type: bytes, data: bytes, now: bytes, flag: bytes, expires: bytes
) -> bytes:
    """One append as the script takes it: a msgpack array of the six strings."""
    if len(run_id) < 32 and len(type) < 32 and len(now) < 32 and len(data) < 0x100 and not expires:
        # The common case (short names, a small event that does not end its run)
        # in one formatting call: appends are the hot path, six pack_str calls
        # and a join cost twice as much.
        return b"\x96%c%b%c%b\xd9%c%b%c%b\xa1%b\xa0" % (
            0xA0 | len(run_id),
            run_id,
            0xA0 | len(type),
            type,
            len(data),
            data,
            0xA0 | len(now),
            now,
            flag,
        )
    return b"".join(
        [
            b"\x96",  # a msgpack array of 6
            pack_str(run_id),
            pack_str(type),
            pack_str(data),
            pack_str(now),
            pack_str(flag),
            pack_str(expires),
        ]
    )


def pack_array(size: int) -> bytes:
    if size < 16:
        return bytes((0x90 | size,))
    if size < 0x10000:
        return b"\xdc" + size.to_bytes(2, "big")
    return b"\xdd" + size.to_bytes(4, "big")


def parse_fetch(run_id: str, reply: Any) -> tuple[RunInfo, list[StoredEvent]]:
    """The run's info and events from the fetch script's (successful) reply."""
    flow, owner, state, created, finished, expires, last_id, first_id = reply[1]
    info = RunInfo(
        run_id=run_id,
        flow=flow.decode(),
        owner=None if owner is None else owner.decode(),
        status=state.decode(),
        created=float(created),
        finished=None if finished is None else float(finished),
        last_id=int(last_id),
        first_id=int(first_id),
        expires=None if expires is None else float(expires),
    )
    # Entries are [b"<id>-0", [b"t", type, b"d", data, b"ts", timestamp]].
    events = [
        StoredEvent(int(entry_id[:-2]), fields[1].decode(), fields[3], float(fields[5]))
        for entry_id, fields in reply[2]
    ]
    return info, events
