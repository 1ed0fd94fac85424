"""The Lua scripts :mod:`sentientedge.store` runs in Redis (no I/O here: the scripts' text).

Rules for these scripts:
- Each step that must not half-happen is one script: Redis runs it whole or not at all, and an
  append-only file replays it whole.
- On a single Redis, a QoS 1 batch is one script (``PUBLISH``). On a Redis Cluster a message's
  keys live in its topic's slot and each recipient's in its session's slot, so the batch is
  split (``CLUSTER_TOPICS``, then ``CLUSTER_SESSIONS`` on each node; the dedupe records are
  marked done afterwards); see ``Store.publish``. The cluster scripts run once per node for
  every slot of the batch that node serves (``allow-cross-slot-keys``).
- Frames are opaque (sealed with ``ENCRYPTION_KEY`` or not): scripts move them, never read them.
"""

from __future__ import annotations

# Shared by the scripts below (Redis runs each script whole: nothing else interleaves).
PRELUDE = """
-- The next seq of a session and its queue entry '{seq}-1'. If the queue is ahead of the counter
-- (the session hash was lost and recreated), the counter catches up first: never a failed XADD.
-- A session queue longer than sq_max (set by the publish script) loses its oldest entries:
-- one stolen identity's sessions cannot fill Redis. Exact trimming: it only costs work once a
-- queue is full, and '~' would let a small bound overshoot by a whole node (100 entries).
local sq_max = 0
local function enqueue(s, sq, frame, dq_offset)
  local seq = redis.call('HINCRBY', s, 'seq', 1)
  local args, id_at = {sq, seq .. '-1', 'f', frame}, 2
  if sq_max > 0 then args, id_at = {sq, 'MAXLEN', sq_max, seq .. '-1', 'f', frame}, 4 end
  if dq_offset then args[#args + 1] = 'dq'; args[#args + 1] = dq_offset end
  local added = redis.pcall('XADD', unpack(args))
  if type(added) == 'table' and added.err then
    local info = redis.call('XINFO', 'STREAM', sq)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        local top = tonumber(string.match(info[i + 1], '^(%d+)'))
        redis.call('HSET', s, 'seq', top)
      end
    end
    seq = redis.call('HINCRBY', s, 'seq', 1)
    args[id_at] = seq .. '-1'
    redis.call('XADD', unpack(args))
  end
  return seq
end

-- Whether a session's hash exists, asked once a script run (a batch names a session often).
local alive = {}
local function is_alive(s)
  local live = alive[s]
  if live == nil then
    live = redis.call('EXISTS', s) == 1
    alive[s] = live
  end
  return live
end

-- Stream ids ('ms-seq') compared as numbers: is a after b?
local function id_after(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if tonumber(am) ~= tonumber(bm) then return tonumber(am) > tonumber(bm) end
  return tonumber(as) > tonumber(bs)
end

-- Copy a drone's queued commands ({offset, frame, ...}, oldest first) this session has not had.
-- Both the publish of a command and the drone's subscribe use this, so commands reach the drone
-- in order whichever of the two runs first. A command at or before the session's 'dq_acked' was
-- acknowledged already (on a cluster it leaves the drone's queue a step after the ack).
-- Returns {seq, frame, ...}.
local function copy_entries(s, sq, sdq, entries, ttl)
  local out = {}
  local acked = redis.call('HGET', s, 'dq_acked') or '0-0'
  for i = 1, #entries, 2 do
    local offset = entries[i]
    if id_after(offset, acked) and redis.call('SADD', sdq, offset) == 1 then
      local frame = entries[i + 1]
      out[#out + 1] = enqueue(s, sq, frame, offset)
      out[#out + 1] = frame
    end
  end
  redis.call('EXPIRE', sdq, ttl)
  return out
end

-- A drone's command queue as {offset, frame, ...}.
local function queued_commands(dq)
  local entries = {}
  for _, entry in ipairs(redis.call('XRANGE', dq, '-', '+')) do
    entries[#entries + 1] = entry[1]
    entries[#entries + 1] = entry[2][2]
  end
  return entries
end

local function copy_commands(s, sq, sdq, dq, ttl)
  return copy_entries(s, sq, sdq, queued_commands(dq), ttl)
end
"""

# A whole batch of QoS 1 messages in one call, stored in order.
# ARGV[1]: MessagePack [key prefix, retained hash key, stream max length, dedupe ttl, session
#   ttl, command queue ttl, command queue max length, then per message: publisher, message id,
#   topic, frame, retain ("0" keep, "1" set, "2" clear), drone the command is for ("" when not a
#   command), number of recipients, then per recipient: session id, "1" if it is the drone's].
# Keys are built here from the prefix (store.Keys spells the same names): passing thousands of
# them as arguments cost more to encode than the batch cost Redis to store. A single Redis only
# (a Redis Cluster runs CLUSTER_TOPICS and CLUSTER_SESSIONS instead).
# Returns per message {1, offset, seq...} when stored, {0, offset} for a repeated id, flattened;
# seq -1: the session is gone. A command's own drone gets it only through copy_commands (so in
# queue order); its seq is the last one copied.
# Per message: GET and SET of the id, XADD to the topic, XADD to each session's queue. Per
# session and batch: whether it exists, its seq counter (kept here, written back once), the time
# to live of its queue. Trimming topic streams by age is housekeeping (MAINTAIN_STREAMS).
PUBLISH = (
    PRELUDE
    + """
local p = cmsgpack.unpack(ARGV[1])
local prefix, retained, maxlen, dedupe_ttl, ttl = p[1], p[2], p[3], p[4], p[5]
local command_ttl, command_maxlen = p[6], p[7]
sq_max = p[8]
local seqs, queues = {}, {}
local result = {}
local m = 9
while m <= #p do
  local who, id, topic, frame = p[m], p[m + 1], p[m + 2], p[m + 3]
  local retain, drone, count = p[m + 4], p[m + 5], p[m + 6]
  local first = m + 7
  m = first + 2 * count
  -- The publisher's length first: no two (publisher, id) pairs share a key, ':' or not.
  local dedupe = prefix .. ':dup:' .. string.len(who) .. ':' .. who .. ':' .. id
  local prev = redis.call('GET', dedupe)
  if prev then
    result[#result + 1] = 0
    result[#result + 1] = prev
  else
    local stream = prefix .. ':t:' .. topic
    local offset = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'f', frame)
    redis.call('SET', dedupe, offset, 'EX', dedupe_ttl)
    if retain == '1' then redis.call('HSET', retained, topic, frame)
    elseif retain == '2' then redis.call('HDEL', retained, topic) end
    local dq = nil
    if drone ~= '' then
      dq = prefix .. ':dq:' .. drone
      redis.call('XADD', dq, 'MAXLEN', command_maxlen, offset, 'f', frame)
      redis.call('EXPIRE', dq, command_ttl)
    end
    result[#result + 1] = 1
    result[#result + 1] = offset
    for r = first, first + 2 * (count - 1), 2 do
      local sid = p[r]
      local s, sq = prefix .. ':s:' .. sid, prefix .. ':sq:' .. sid
      local live = is_alive(s)
      local seq = -1
      if live then
        queues[sq] = true
        if dq and p[r + 1] == '1' then
          -- The drone's own command: through its command queue, in that queue's order. That
          -- path counts seqs in Redis, so the count kept here is written back first.
          if seqs[s] then redis.call('HSET', s, 'seq', seqs[s]); seqs[s] = nil end
          local copied = copy_commands(s, sq, prefix .. ':sdq:' .. sid, dq, ttl)
          seq = copied[#copied - 1] or 0
        else
          seq = seqs[s]
          if seq == nil then seq = tonumber(redis.call('HGET', s, 'seq') or '0') end
          seq = seq + 1
          local added = redis.pcall('XADD', sq, 'MAXLEN', sq_max, seq .. '-1', 'f', frame)
          if type(added) == 'table' and added.err then
            -- The queue is ahead of the counter (the session hash was lost and made again):
            -- the counter catches up with the queue; a seq is never handed out twice.
            redis.call('HSET', s, 'seq', seq - 1)
            seq = enqueue(s, sq, frame, nil)
          end
          seqs[s] = seq
        end
      end
      result[#result + 1] = seq
    end
  end
end
for s, seq in pairs(seqs) do redis.call('HSET', s, 'seq', seq) end
for sq in pairs(queues) do redis.call('EXPIRE', sq, ttl) end
return result
"""
)

# ARGV[1]: MessagePack [ttl, then per drone: its key, frame, ts]: the drones' last telemetry,
# each in its hash for the ttl. On a cluster, run per node with the drones that node serves.
SAVE_TELEMETRY = """
local p = cmsgpack.unpack(ARGV[1])
local ttl = p[1]
for i = 2, #p, 3 do
  redis.call('HSET', p[i], 'f', p[i + 1], 'ts', p[i + 2])
  redis.call('EXPIRE', p[i], ttl)
end
return (#p - 1) / 3
"""

# ARGV[1]: MessagePack [min id for age, stream ttl, stream key...]: the topics' streams lose
# what is older than the retention and live another retention from their last message.
MAINTAIN_STREAMS = """
local p = cmsgpack.unpack(ARGV[1])
local min_id, stream_ttl = p[1], p[2]
for i = 3, #p do
  redis.call('XTRIM', p[i], 'MINID', '~', min_id)
  redis.call('EXPIRE', p[i], stream_ttl)
end
return #p - 2
"""

# KEYS: s, sq, sdq, and the drone's command queue when it is in the same slot. ARGV: seq, "1"
# for a drone's session. Moves the acknowledged position; returns {acked, command offsets acked}.
# A drone's acked commands leave its command queue: here, or (a cluster: another slot) in a
# second step with the offsets returned; 'dq_acked' keeps them from being copied again meanwhile.
ACK = """
local acked = tonumber(redis.call('HGET', KEYS[1], 'acked') or '0')
local last = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local upto = math.min(tonumber(ARGV[1]), last)
if upto <= acked then return {acked} end
local out = {upto}
if ARGV[2] == '1' then
  for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', upto .. '-1')) do
    local fields = entry[2]
    for j = 1, #fields, 2 do
      if fields[j] == 'dq' then
        local offset = fields[j + 1]
        if KEYS[4] then redis.call('XDEL', KEYS[4], offset) end
        redis.call('SREM', KEYS[3], offset)
        out[#out + 1] = offset
      end
    end
  end
  if #out > 1 then redis.call('HSET', KEYS[1], 'dq_acked', out[#out]) end
end
redis.call('XTRIM', KEYS[2], 'MINID', (upto + 1) .. '-0')
redis.call('HSET', KEYS[1], 'acked', upto)
return out
"""

# KEYS: s, sq, sdq, dq. ARGV: session ttl. The drone subscribed to its command topic.
BIND_COMMANDS = (
    PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local out = copy_commands(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return out
"""
)

# KEYS: s, sq, sdq. ARGV: principal, ingress, session ttl.
# A connection resumes the session: only for the same principal; its keys live another TTL
# from now. Returns {principal, seq, acked, subs} or {} when there is nothing to resume.
CLAIM = """
if redis.call('HGET', KEYS[1], 'principal') ~= ARGV[1] then return {} end
redis.call('HSET', KEYS[1], 'ingress', ARGV[2])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return redis.call('HMGET', KEYS[1], 'principal', 'seq', 'acked', 'subs')
"""

# KEYS: s, sq, sdq. ARGV: principal, ingress, session ttl, subscriptions (JSON).
# A held session lives another TTL, with the subscriptions its connection holds. If Redis lost
# its hash (a restart without the data), it is made again consistent with its queue.
TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  local seq = 0
  local acked = 0
  if redis.call('EXISTS', KEYS[2]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[2])
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        seq = tonumber(string.match(info[i + 1], '^(%d+)'))
      end
    end
    local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
    acked = seq
    if #first > 0 then acked = tonumber(string.match(first[1][1], '^(%d+)')) - 1 end
  end
  redis.call('HSET', KEYS[1], 'principal', ARGV[1], 'seq', seq, 'acked', acked)
end
redis.call('HSET', KEYS[1], 'ingress', ARGV[2], 'subs', ARGV[4])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return 1
"""

# KEYS: s. ARGV: seq. The counter never goes back: a session seq is never handed out twice.
RAISE_SEQ = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'seq', ARGV[1])
end
return 1
"""

# KEYS: s. ARGV: subscriptions (JSON). Only for a session that exists: never a hash without TTL.
SAVE_SUBS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'subs', ARGV[1])
return 1
"""


# KEYS: the admin's hash. ARGV: the time step of the code just used, then field, value pairs.
# Compare-and-set: two logins racing with one code must not both pass (RFC 6238 section 5.2).
SAVE_ADMIN_LOGIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'last_otp_step') or '0') >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""


# Marks a cluster's QoS 1 messages done in their dedupe records: {publisher, message id, topic,
# offset} each.
DONE_MARKS = """
local function mark_done(prefix, marks)
  for _, m in ipairs(marks) do
    local who, id, topic = m[1], m[2], m[3]
    local tag = '{' .. topic .. '}'
    local dedupe = prefix .. ':dup:' .. tag .. ':' .. string.len(who) .. ':' .. who .. ':' .. id
    redis.call('SET', dedupe, m[4], 'KEEPTTL')
  end
end
"""

# Redis Cluster, step 1 of a QoS 1 batch, on each node for the topics it serves.
# ARGV[1]: MessagePack [key prefix, stream max length, dedupe ttl, command queue ttl, command
#   queue max length, marks of earlier messages now done (as CLUSTER_DONE's), then per
#   message: publisher, message id, topic, frame, retain ("0" keep, "1" set, "2" clear),
#   command ("" not one, "1" for a drone among the recipients, else "0")].
# A command's topic is drone/{id}/cmd: the drone's queue shares the topic's tag, and so does
# the topic's retained message. The dedupe record says
# 'p:{offset}' (pending) until the message is in every recipient's queue (then a later call
# writes the offset alone): a publisher retrying a pending message gets its queues written again.
# Returns per message {state, offset, command queue} with state 1 stored now, 2 pending from
# an earlier attempt, 0 a repeat of a message fully stored; the command queue ({offset, frame,
# ...}) when the message is a command for a recipient.
CLUSTER_TOPICS = (
    """#!lua flags=allow-cross-slot-keys
"""
    + PRELUDE
    + DONE_MARKS
    + """
local p = cmsgpack.unpack(ARGV[1])
local prefix, maxlen, dedupe_ttl, command_ttl, command_maxlen = p[1], p[2], p[3], p[4], p[5]
mark_done(prefix, p[6])
local result = {}
for m = 7, #p, 6 do
  local who, id, topic, frame = p[m], p[m + 1], p[m + 2], p[m + 3]
  local retain, owned = p[m + 4], p[m + 5]
  local tag = '{' .. topic .. '}'
  local dedupe = prefix .. ':dup:' .. tag .. ':' .. string.len(who) .. ':' .. who .. ':' .. id
  local dq = prefix .. ':dq:' .. tag
  local prev = redis.call('GET', dedupe)
  local state, offset = 1, nil
  if prev then
    offset = string.match(prev, '^p:(.*)$')
    if offset then state = 2 else state, offset = 0, prev end
  else
    offset = redis.call('XADD', prefix .. ':t:' .. tag, 'MAXLEN', '~', maxlen, '*', 'f', frame)
    redis.call('SET', dedupe, 'p:' .. offset, 'EX', dedupe_ttl)
    if retain == '1' then redis.call('SET', prefix .. ':r:' .. tag, frame)
    elseif retain == '2' then redis.call('DEL', prefix .. ':r:' .. tag) end
    if owned ~= '' then
      redis.call('XADD', dq, 'MAXLEN', command_maxlen, offset, 'f', frame)
      redis.call('EXPIRE', dq, command_ttl)
    end
  end
  local queue = {}
  if state ~= 0 and owned == '1' then queue = queued_commands(dq) end
  result[#result + 1] = {state, offset, queue}
end
return result
"""
)

# Redis Cluster, step 2 of a QoS 1 batch (and a drone's subscribe to its commands), on each node
# for the sessions it serves.
# ARGV[1]: MessagePack [key prefix, session ttl, session queue max length, messages ({frame,
#   topic, offset} each), command queues, then per delivery: session id, message number (n > 0:
#   messages[n]) or command queue number (-n: copy what the session has not had of queues[n])].
# A session's hash keeps the offset of the last message it got of each topic ('o:{topic}'): a
# message whose earlier attempt failed after this step is not queued twice for a session that
# got it then (unless other messages of its topic reached the session in between: it is queued
# again, never skipped).
# Returns per delivery its seq (-1: the session is gone, 0: it had the message), or for a
# command queue {seq, frame, ...} of what was copied.
CLUSTER_SESSIONS = (
    """#!lua flags=allow-cross-slot-keys
"""
    + PRELUDE
    + """
local p = cmsgpack.unpack(ARGV[1])
local prefix, ttl, frames, command_queues = p[1], p[2], p[4], p[5]
sq_max = p[3]
local queues, result = {}, {}
for d = 6, #p, 2 do
  local tag = '{' .. p[d] .. '}'
  local s, sq = prefix .. ':s:' .. tag, prefix .. ':sq:' .. tag
  local live = is_alive(s)
  local ref = p[d + 1]
  if ref > 0 then
    local seq = -1
    if live then
      local message = frames[ref]
      local mark = 'o:' .. message[2]
      if redis.call('HGET', s, mark) == message[3] then
        seq = 0  -- a retry of a message this session got already
      else
        seq = enqueue(s, sq, message[1], nil)
        redis.call('HSET', s, mark, message[3])
      end
    end
    result[#result + 1] = seq
  elseif live then
    result[#result + 1] = copy_entries(s, sq, prefix .. ':sdq:' .. tag, command_queues[-ref], ttl)
  else
    result[#result + 1] = -1
  end
  if live then queues[sq] = true end
end
for sq in pairs(queues) do redis.call('EXPIRE', sq, ttl) end
return result
"""
)

# Redis Cluster, after a QoS 1 batch, on each node for the topics it serves (usually carried
# by the next batch's CLUSTER_TOPICS).
# ARGV[1]: MessagePack [key prefix, marks]: messages in every recipient's queue, whose dedupe
# records (CLUSTER_TOPICS names them the same way) now say so.

CLUSTER_DONE = (
    """#!lua flags=allow-cross-slot-keys
"""
    + DONE_MARKS
    + """
local p = cmsgpack.unpack(ARGV[1])
mark_done(p[1], p[2])
return #p[2]
"""
)
