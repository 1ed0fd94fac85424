"""Everything the router keeps in Redis. The only module that talks to Redis (with
:mod:`sentientedge.redis_cluster`, which finds where a router's slot is served in a cluster).

Rules for this module:
- Keys start with ``{namespace}:`` so several routers can share one Redis.
- Every Redis failure surfaces as :class:`StoreUnavailable`; callers decide what degrades.
- Each step that must not half-happen (store + dedupe + queue for every session) is one Lua
  script: Redis runs it whole or not at all, and an append-only file replays it whole.
- Async (redis.asyncio) for the actors, sync helpers for the CLI.

The durable model (QoS 1, PROTOCOL.md "Delivery", "Sessions and resume", "Commands"):

- ``t:{topic}``        stream: every QoS 1 message of a topic; its entry id is the ``offset``
                       in ``puback``. Trimmed by length and age (``STREAM_MAX_LEN``,
                       ``STREAM_MAX_AGE_S``); sessions never read it, so trimming takes
                       nothing a session still needs.
- ``dup:{len}:{who}:{id}`` the offset a publisher's message id got; kept ``DEDUPE_TTL_S``.
- ``s:{sid}``          hash: ``principal``, ``seq`` (last assigned), ``acked``, ``subs``,
                       ``ingress`` (the one that last held it).
- ``sq:{sid}``         stream: the session's unacknowledged QoS 1 messages, entry id
                       ``{seq}-1``; a copy of the frame, so a session owns what it must deliver.
- ``sdq:{sid}``        set: drone-command offsets already copied into this session.
- ``dq:{drone}``       stream: a drone's commands until one of its sessions acks them.
- ``retained``         hash: topic -> the last retained ``msg`` frame.
- ``drone:{id}``       hash: the drone's last telemetry frame and its time.
All session keys expire ``SESSION_TTL`` after the session was last seen.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, TypeVar

import msgpack
import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.retry import Retry as SyncRetry

from sentientedge.auth import Identity
from sentientedge.config import Config
from sentientedge.errors import StoreUnavailable
from sentientedge.records import Publication, Retention, SessionRecord, Stored
from sentientedge.redis_cluster import ClusterEndpoint, SlotConnection, cluster_master, key_prefix
from sentientedge.sealing import KeyRing, SealingError, open_stored

log = logging.getLogger(__name__)

_TIMEOUT_S = 2.0
FRAME_CONTEXT = b"se-frame"  # associated data of every sealed frame (sealing.py)
_RETAIN = ("0", "1", "2")  # Publication.retain: keep, set, clear
_POOL_SIZE = 32  # Redis connections per router process
T = TypeVar("T")

# Shared by the scripts below (Redis runs each script whole: nothing else interleaves).
_LUA_PRELUDE = """
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

-- Copy the drone's queued commands this session has not had, oldest first. Both the publish
-- of a command and the drone's subscribe use this, so commands reach the drone in order
-- whichever of the two runs first. Returns {seq, frame, ...}.
local function copy_commands(s, sq, sdq, dq, ttl)
  local out = {}
  for _, entry in ipairs(redis.call('XRANGE', dq, '-', '+')) do
    local offset = entry[1]
    if redis.call('SADD', sdq, offset) == 1 then
      local frame = entry[2][2]
      out[#out + 1] = enqueue(s, sq, frame, offset)
      out[#out + 1] = frame
    end
  end
  redis.call('EXPIRE', sdq, ttl)
  return out
end
"""

# A whole batch of QoS 1 messages in one call, stored in order.
# ARGV[1]: MessagePack [key prefix, retained hash key, stream max length, dedupe ttl, session
#   ttl, command queue ttl, command queue max length, then per message: publisher, message id,
#   topic, frame, retain ("0" keep, "1" set, "2" clear), drone the command is for ("" when not a
#   command), number of recipients, then per recipient: session id, "1" if it is the drone's].
# Keys are built here from the prefix (Keys below spells the same names): passing thousands of
# them as arguments cost more to encode than the batch cost Redis to store. (A batch spans many
# keys, so this script is for a single Redis; a Redis Cluster needs it split per slot.)
# Returns per message {1, offset, seq...} when stored, {0, offset} for a repeated id, flattened;
# seq -1: the session is gone. A command's own drone gets it only through copy_commands (so in
# queue order); its seq is the last one copied.
# Per message: GET and SET of the id, XADD to the topic, XADD to each session's queue. Per
# session and batch: whether it exists, its seq counter (kept here, written back once), the time
# to live of its queue. Trimming topic streams by age is housekeeping (_MAINTAIN_STREAMS).
_PUBLISH = (
    _LUA_PRELUDE
    + """
local p = cmsgpack.unpack(ARGV[1])
local prefix, retained, maxlen, dedupe_ttl, ttl = p[1], p[2], p[3], p[4], p[5]
local command_ttl, command_maxlen = p[6], p[7]
sq_max = p[8]
local alive, seqs, queues = {}, {}, {}
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
      local live = alive[s]
      if live == nil then
        live = redis.call('EXISTS', s) == 1
        alive[s] = live
      end
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

# ARGV[1]: MessagePack [key prefix, ttl, then per drone: id, frame, ts]: the drones' last
# telemetry, each in its hash for the ttl.
_SAVE_TELEMETRY = """
local p = cmsgpack.unpack(ARGV[1])
local prefix, ttl = p[1], p[2]
for i = 3, #p, 3 do
  local key = prefix .. ':drone:' .. p[i]
  redis.call('HSET', key, 'f', p[i + 1], 'ts', p[i + 2])
  redis.call('EXPIRE', key, ttl)
end
return (#p - 2) / 3
"""

# ARGV[1]: MessagePack [key prefix, min id for age, stream ttl, topic...]: the topics' streams
# lose what is older than the retention and live another retention from their last message.
_MAINTAIN_STREAMS = """
local p = cmsgpack.unpack(ARGV[1])
local prefix, min_id, stream_ttl = p[1], p[2], p[3]
for i = 4, #p do
  local stream = prefix .. ':t:' .. p[i]
  redis.call('XTRIM', stream, 'MINID', '~', min_id)
  redis.call('EXPIRE', stream, stream_ttl)
end
return #p - 3
"""

# KEYS: s, sq, sdq, dq (of the session's drone, or sq again). ARGV: seq, is a drone.
# Moves the acknowledged position; a drone's acked commands leave its command queue.
_ACK = """
local acked = tonumber(redis.call('HGET', KEYS[1], 'acked') or '0')
local last = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local upto = math.min(tonumber(ARGV[1]), last)
if upto <= acked then return acked end
if ARGV[2] == '1' then
  for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', upto .. '-1')) do
    local fields = entry[2]
    for j = 1, #fields, 2 do
      if fields[j] == 'dq' then
        redis.call('XDEL', KEYS[4], fields[j + 1])
        redis.call('SREM', KEYS[3], fields[j + 1])
      end
    end
  end
end
redis.call('XTRIM', KEYS[2], 'MINID', (upto + 1) .. '-0')
redis.call('HSET', KEYS[1], 'acked', upto)
return upto
"""

# KEYS: s, sq, sdq, dq. ARGV: session ttl. The drone subscribed to its command topic.
_BIND_COMMANDS = (
    _LUA_PRELUDE
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
_CLAIM = """
if redis.call('HGET', KEYS[1], 'principal') ~= ARGV[1] then return {} end
redis.call('HSET', KEYS[1], 'ingress', ARGV[2])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return redis.call('HMGET', KEYS[1], 'principal', 'seq', 'acked', 'subs')
"""

# KEYS: s, sq, sdq. ARGV: principal, ingress, session ttl, subscriptions (JSON).
# A held session lives another TTL, with the subscriptions its connection holds. If Redis lost
# its hash (a restart without the data), it is made again consistent with its queue.
_TOUCH = """
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
_RAISE_SEQ = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'seq', ARGV[1])
end
return 1
"""

# KEYS: s. ARGV: subscriptions (JSON). Only for a session that exists: never a hash without TTL.
_SAVE_SUBS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'subs', ARGV[1])
return 1
"""


# KEYS: the admin's hash. ARGV: the time step of the code just used, then field, value pairs.
# Compare-and-set: two logins racing with one code must not both pass (RFC 6238 section 5.2).
_SAVE_ADMIN_LOGIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'last_otp_step') or '0') >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""


class Keys:
    def __init__(self, namespace: str, cluster: bool = False) -> None:
        namespace = key_prefix(namespace, cluster)
        self.prefix = namespace
        self.revoked_keys = f"{namespace}:apikeys:revoked"
        self.revoked_tokens = f"{namespace}:tokens:revoked"  # zset: jti -> exp
        self.revocations = f"{namespace}:revocations"  # stream every ingress follows
        self.issued_keys = f"{namespace}:apikeys:issued"
        self.retained = f"{namespace}:retained"
        self.shape = f"{namespace}:shape"
        self.admins = f"{namespace}:admins"  # set of enrolled admin names
        self.replication_mark = f"{namespace}:replicated"  # bumped before WAIT (Store.publish)

    def admin(self, name: str) -> str:
        return f"{self.prefix}:admin:{name}"

    def login_failures(self, subject: str) -> str:
        return f"{self.prefix}:login:{subject}"

    def topic(self, topic: str) -> str:
        return f"{self.prefix}:t:{topic}"

    def dedupe(self, who: str, msg_id: str) -> str:
        # The publisher's length first: ("a:b", "c") and ("a", "b:c") must not share a key.
        return f"{self.prefix}:dup:{len(who)}:{who}:{msg_id}"

    def session(self, sid: str) -> str:
        return f"{self.prefix}:s:{sid}"

    def session_queue(self, sid: str) -> str:
        return f"{self.prefix}:sq:{sid}"

    def session_commands(self, sid: str) -> str:
        return f"{self.prefix}:sdq:{sid}"

    def drone_commands(self, drone_id: str) -> str:
        return f"{self.prefix}:dq:{drone_id}"

    def drone(self, drone_id: str) -> str:
        return f"{self.prefix}:drone:{drone_id}"


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


class Store:
    """The async store used inside the router's processes."""

    def __init__(
        self,
        url: str,
        namespace: str,
        retention: Retention | None = None,
        sealing: KeyRing | None = None,
        cluster: bool = False,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        """``cluster``: ``url`` is a node of a Redis Cluster (every key in the router's slot,
        on whichever master serves it). ``wait_replicas``: a QoS 1 batch counts as stored once
        that many replicas have it (``WAIT``), so a master's failover cannot lose a puback."""
        self.url = url
        # ENCRYPTION_KEY: every frame is sealed here on its way in and opened on its way out;
        # Lua moves the sealed blobs between keys without reading them.
        self.sealing = sealing
        self.keys = Keys(namespace, cluster)
        self.retention = retention or Retention()
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.endpoint = ClusterEndpoint(url, namespace) if cluster else None
        # A bounded pool that waits for a free connection: a burst of handshakes (each claims
        # or creates its session) must queue, not fail with "too many connections".
        where: dict[str, Any] = {}
        if self.endpoint is not None:
            where = {"connection_class": SlotConnection, "endpoint": self.endpoint}
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            **where,
            max_connections=_POOL_SIZE,
            timeout=_TIMEOUT_S,
            socket_timeout=_TIMEOUT_S,
            socket_connect_timeout=_TIMEOUT_S,
            # redis-py retries a failed command three times with backoff of up to seconds by
            # default. Here a failure must answer at once (QoS 1 publishers hear "unavailable"
            # and retry): one immediate retry on a fresh connection, no backoff.
            retry=Retry(NoBackoff(), 1),
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._reconnecting: asyncio.Task[None] | None = None
        if self.endpoint is not None:
            self.endpoint.on_move = self._reconnect_all
        self._publish: AsyncScript = self._redis.register_script(_PUBLISH)
        self._maintain_streams: AsyncScript = self._redis.register_script(_MAINTAIN_STREAMS)
        self._save_telemetry: AsyncScript = self._redis.register_script(_SAVE_TELEMETRY)
        self._ack: AsyncScript = self._redis.register_script(_ACK)
        self._bind: AsyncScript = self._redis.register_script(_BIND_COMMANDS)
        self._claim: AsyncScript = self._redis.register_script(_CLAIM)
        self._touch: AsyncScript = self._redis.register_script(_TOUCH)
        self._save_subs: AsyncScript = self._redis.register_script(_SAVE_SUBS)
        self._raise_seq: AsyncScript = self._redis.register_script(_RAISE_SEQ)
        self._save_admin_login: AsyncScript = self._redis.register_script(_SAVE_ADMIN_LOGIN)
        self._revoked_cache: set[str] = set()

    @classmethod
    def for_config(cls, config: Config) -> Store:
        """The store of a router process (``up`` has settled REDIS_CLUSTER and the replicas
        to wait for)."""
        assert config.redis_url is not None
        return cls(
            config.redis_url,
            config.ray_namespace,
            config.retention,
            config.key_ring,
            cluster=bool(config.redis_cluster),
            wait_replicas=config.redis_wait_replicas or 0,
            wait_timeout_ms=config.redis_wait_timeout_ms,
        )

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)

    def _reconnect_all(self) -> None:
        """Every connection, idle or in use, reconnects (to the slot's new node) when next used."""
        pool = self._redis.connection_pool
        self._reconnecting = asyncio.get_running_loop().create_task(
            pool.disconnect(inuse_connections=True)
        )

    def _seal(self, frame: bytes) -> bytes:
        return frame if self.sealing is None else self.sealing.seal(frame, FRAME_CONTEXT)

    def _open(self, blob: bytes) -> bytes:
        """A stored frame in the clear; frames stored before ENCRYPTION_KEY was set pass as
        they are (SealingError for a sealed one that no key in force opens)."""
        return open_stored(self.sealing, blob, FRAME_CONTEXT)

    async def _guard(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            return await operation()
        except (redis.RedisError, OSError) as exc:
            if self.endpoint is not None:
                self.endpoint.suspect(exc)
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}"[:200]) from None

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (redis.RedisError, OSError):
            if self.endpoint is not None:
                self.endpoint.suspect()
            return False

    # API keys

    async def is_revoked(self, identity: Identity) -> bool:
        """Whether the credential an identity presented (API key id or token jti) was revoked.

        When Redis cannot answer, the last set read decides: a Redis outage must not lock every
        drone out, and revocations older than the outage still hold.
        """
        credential = identity.credential_id
        if not credential:
            return False
        try:
            if identity.via_api_key:
                revoked = bool(await self._redis.sismember(self.keys.revoked_keys, credential))
            else:
                score = await self._redis.zscore(self.keys.revoked_tokens, credential)
                revoked = score is not None
        except (redis.RedisError, OSError):
            return credential in self._revoked_cache
        if revoked:
            self._revoked_cache.add(credential)
        return revoked

    async def refresh_revocations(self) -> None:
        """Re-read every revoked key id and jti, so an outage later still refuses them all."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.smembers(self.keys.revoked_keys)
        pipe.zrange(self.keys.revoked_tokens, 0, -1)
        keys, tokens = await self._guard(pipe.execute)
        self._revoked_cache = {_text(m) for m in keys} | {_text(m) for m in tokens}

    async def revocation_cursor(self) -> str:
        """Where the revocation stream ends now: follow it from here."""
        last: Any = await self._guard(lambda: self._redis.xrevrange(self.keys.revocations, count=1))
        return _text(last[0][0]) if last else "0-0"

    async def revocations_after(self, cursor: str) -> tuple[str, list[str]]:
        """Credential ids revoked since ``cursor``, and the cursor after them."""
        read: Any = await self._guard(
            lambda: self._redis.xread({self.keys.revocations: cursor}, count=1000)
        )
        revoked: list[str] = []
        for _stream, entries in read or []:
            for entry_id, fields in entries:
                cursor = _text(entry_id)
                credential = _text(fields.get(b"id") or fields.get("id"))
                revoked.append(credential)
                self._revoked_cache.add(credential)
        return cursor, revoked

    # Admins (sentientedge.admins: the records are made and checked there)

    async def admin(self, name: str) -> dict[bytes, bytes] | None:
        record: Any = await self._guard(lambda: self._redis.hgetall(self.keys.admin(name)))
        return record or None

    async def save_admin_login(self, name: str, record: Mapping[str, str], step: int) -> bool:
        """Store an admin's record after a login, unless a login with this code (or a later
        one) was stored first; False then: the code was replayed."""
        args: list[Any] = [step]
        for field, value in record.items():
            args += [field, value]
        stored = await self._guard(
            partial(self._save_admin_login, keys=[self.keys.admin(name)], args=args)
        )
        return bool(stored)

    async def login_wait(
        self, subjects: list[tuple[str, int]], window_s: float, now: float
    ) -> float | None:
        """Seconds before another login may be tried, by the failures every ingress recorded:
        each subject (an admin name, a client address) keeps its last ``limit`` failure times,
        newest first; ``limit`` of them within the window block it until the oldest ages out."""
        pipe = self._redis.pipeline(transaction=False)
        for subject, limit in subjects:
            pipe.lrange(self.keys.login_failures(subject), 0, limit - 1)
        lists: Any = await self._guard(pipe.execute)
        waits = []
        for (_, limit), times in zip(subjects, lists, strict=True):
            recent = [t for t in map(float, times) if t > now - window_s]
            if len(recent) >= limit:
                waits.append(recent[limit - 1] + window_s - now)
        return max(waits) if waits else None

    async def login_failed(
        self, subjects: list[tuple[str, int]], window_s: float, now: float
    ) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for subject, limit in subjects:
            key = self.keys.login_failures(subject)
            pipe.lpush(key, repr(now))
            pipe.ltrim(key, 0, limit - 1)
            pipe.expire(key, math.ceil(window_s))
        await self._guard(pipe.execute)

    async def login_succeeded(self, subject: str) -> None:
        await self._guard(lambda: self._redis.delete(self.keys.login_failures(subject)))

    # QoS 1

    async def publish(self, publications: list[Publication]) -> list[Stored | StoreUnavailable]:
        """Store a batch of QoS 1 messages in order: one script call, one round trip."""
        if not publications:
            return []
        keys, retention = self.keys, self.retention
        params: list[Any] = [
            keys.prefix,
            keys.retained,
            retention.stream_max_len,
            retention.dedupe_ttl_s,
            retention.session_ttl_s,
            retention.command_ttl_s,
            retention.command_max_len,
            retention.session_queue_max,
        ]
        extend = params.extend
        for pub in publications:
            recipients = pub.recipients
            extend(
                (
                    pub.principal,
                    pub.msg_id,
                    pub.topic,
                    self._seal(pub.frame),
                    _RETAIN[pub.retain],
                    pub.command_for or "",
                    len(recipients),
                )
            )
            for sid, owner in recipients:
                extend((sid, "1" if owner else "0"))
        # Redis's cmsgpack predates the bin type: frames go as (binary-safe) raw strings.
        packed = msgpack.packb(params, use_bin_type=False)
        try:
            if self.wait_replicas:
                raw, replicated = await self._guard(partial(self._publish_replicated, packed))
            else:
                raw = await self._guard(partial(self._publish, keys=[], args=[packed]))
                replicated = True
        except StoreUnavailable as exc:
            return [exc] * len(publications)
        results: list[Stored | StoreUnavailable] = []
        at = 0
        for pub in publications:
            stored, offset = raw[at], _text(raw[at + 1])
            at += 2
            if stored == 0:
                results.append(Stored(offset, True, (), replicated))
                continue
            count = len(pub.recipients)
            results.append(Stored(offset, False, tuple(raw[at : at + count]), replicated))
            at += count
        return results

    async def _publish_replicated(self, packed: bytes) -> tuple[Any, bool]:
        """The batch, then ``WAIT`` on the same connection for ``wait_replicas`` replicas.

        WAIT counts replicas that have this connection's writes; a batch of repeats writes
        nothing, so a counter is bumped first: the replicas then also have whatever the first
        attempt of a repeated message wrote."""
        pipe = self._redis.pipeline(transaction=False)
        await self._publish(keys=[], args=[packed], client=pipe)
        pipe.incr(self.keys.replication_mark)
        pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
        raw, _, replicas = await pipe.execute()
        if int(replicas) < self.wait_replicas:
            log.warning(
                "QoS 1 batch on %d of %d replicas after %d ms: publishers asked to send again",
                int(replicas), self.wait_replicas, self.wait_timeout_ms,
            )  # fmt: skip
        return raw, int(replicas) >= self.wait_replicas

    async def maintain_streams(self, topics: list[str]) -> None:
        """Trim the topics' streams by age and let them live another retention: housekeeping
        for the topics written lately, not work for every batch."""
        retention = self.retention
        if not topics or not retention.stream_max_age_s:
            return
        min_id = f"{int(time.time() * 1000) - retention.stream_max_age_s * 1000}-0"
        packed = msgpack.packb([self.keys.prefix, min_id, retention.stream_max_age_s, *topics])
        await self._guard(partial(self._maintain_streams, keys=[], args=[packed]))

    async def create_session(self, sid: str, principal: str, ingress: str) -> None:
        key = self.keys.session(sid)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "principal": principal,
                "seq": 0,
                "acked": 0,
                "subs": "[]",
                "ingress": ingress,
            },
        )
        pipe.expire(key, self.retention.session_ttl_s)
        await self._guard(pipe.execute)

    def _session_keys(self, sid: str) -> list[str]:
        keys = self.keys
        return [keys.session(sid), keys.session_queue(sid), keys.session_commands(sid)]

    async def claim_session(self, sid: str, principal: str, ingress: str) -> SessionRecord | None:
        """Resume ``sid`` for ``principal``: its record, its keys good for another TTL; or None
        when there is no such session for this principal."""
        args: list[Any] = [principal, ingress, self.retention.session_ttl_s]
        raw: Any = await self._guard(partial(self._claim, keys=self._session_keys(sid), args=args))
        if not raw:
            return None
        return SessionRecord(
            principal=_text(raw[0]),
            seq=int(raw[1] or 0),
            acked=int(raw[2] or 0),
            subscriptions=tuple(json.loads(raw[3] or b"[]")),
        )

    async def save_subscriptions(self, sid: str, subscriptions: list[str]) -> None:
        args = [json.dumps(sorted(subscriptions))]
        await self._guard(partial(self._save_subs, keys=[self.keys.session(sid)], args=args))

    async def touch_sessions(
        self, sessions: dict[str, tuple[str, list[str]]], ingress: str
    ) -> None:
        """Keep held sessions alive another SESSION_TTL: sid -> (principal, subscriptions)."""
        if not sessions:
            return
        pipe = self._redis.pipeline(transaction=False)
        ttl = self.retention.session_ttl_s
        for sid, (principal, subscriptions) in sessions.items():
            args: list[Any] = [principal, ingress, ttl, json.dumps(sorted(subscriptions))]
            await self._touch(keys=self._session_keys(sid), args=args, client=pipe)
        await self._guard(pipe.execute)

    async def raise_seqs(self, seqs: dict[str, int]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for sid, seq in seqs.items():
            await self._raise_seq(keys=[self.keys.session(sid)], args=[seq], client=pipe)
        await self._guard(pipe.execute)

    async def session_seqs(self, sids: list[str]) -> dict[str, int]:
        """The last seq stored for each session (a session missing in Redis is left out)."""
        pipe = self._redis.pipeline(transaction=False)
        for sid in sids:
            pipe.hget(self.keys.session(sid), "seq")
        values = await self._guard(pipe.execute)
        return {sid: int(v) for sid, v in zip(sids, values, strict=True) if v is not None}

    async def ack(self, sid: str, seq: int, drone_id: str | None) -> int:
        keys = self.keys
        script_keys = [
            *self._session_keys(sid),
            keys.drone_commands(drone_id) if drone_id else keys.session_queue(sid),
        ]
        args = [seq, "1" if drone_id else "0"]
        return int(await self._guard(lambda: self._ack(keys=script_keys, args=args)))

    async def session_messages(
        self, sid: str, first_seq: int, count: int
    ) -> list[tuple[int, bytes]]:
        """Up to ``count`` queued messages of a session from ``first_seq`` on: (seq, frame)."""
        key = self.keys.session_queue(sid)
        entries: Any = await self._guard(
            lambda: self._redis.xrange(key, min=f"{first_seq}-0", max="+", count=count)
        )
        out = []
        for entry_id, fields in entries:
            seq = int(_text(entry_id).split("-")[0])
            try:
                out.append((seq, self._open(fields[b"f"])))
            except SealingError as exc:  # a key retired too early: skip it, say so loudly
                log.error("session %s message %d cannot be opened: %s", sid, seq, exc)
        return out

    async def bind_commands(self, sid: str, drone_id: str) -> list[tuple[int, bytes]]:
        keys = self.keys
        script_keys = [*self._session_keys(sid), keys.drone_commands(drone_id)]
        raw = await self._guard(
            lambda: self._bind(keys=script_keys, args=[self.retention.session_ttl_s])
        )
        return [(int(raw[i]), self._open(raw[i + 1])) for i in range(0, len(raw), 2)]

    async def sessions(self) -> list[tuple[str, str, str, list[str]]]:
        """Every stored session: (id, principal, ingress, subscriptions). For a shard's restart."""
        prefix = self.keys.session("")
        found = []
        async for key in self._scan(prefix + "*"):
            found.append(key)
        out = []
        for start in range(0, len(found), 500):
            pipe = self._redis.pipeline(transaction=False)
            chunk = found[start : start + 500]
            for key in chunk:
                pipe.hmget(key, "principal", "ingress", "subs")
            for key, (principal, ingress, subs) in zip(
                chunk, await self._guard(pipe.execute), strict=True
            ):
                if principal is not None:
                    sid = _text(key)[len(prefix) :]
                    out.append((sid, _text(principal), _text(ingress), json.loads(subs or b"[]")))
        return out

    async def telemetry(self) -> dict[str, tuple[bytes, int]]:
        """Every drone's last telemetry: drone id -> (frame, ts)."""
        prefix = self.keys.drone("")
        out = {}
        async for key in self._scan(prefix + "*"):
            raw: Any = await self._guard(partial(self._redis.hmget, key, "f", "ts"))
            if raw[0] is not None:
                out[_text(key)[len(prefix) :]] = (self._open(raw[0]), int(raw[1] or 0))
        return out

    async def _scan(self, pattern: str) -> Any:
        cursor: Any = 0
        while True:
            page: Any = await self._guard(
                partial(self._redis.scan, cursor=cursor, match=pattern, count=1000)
            )
            cursor, keys = page
            for key in keys:
                yield key
            if int(cursor) == 0:
                return

    # The router's shape (the controller's; restarted actors read it)

    async def save_shape(self, shape: dict[str, Any]) -> None:
        await self._guard(lambda: self._redis.set(self.keys.shape, json.dumps(shape)))

    async def shape(self) -> dict[str, Any] | None:
        """The ingresses and shards the controller last put in place, if it did."""
        raw: Any = await self._guard(lambda: self._redis.get(self.keys.shape))
        return json.loads(raw) if raw else None

    # Retained messages and last telemetry

    async def retained(self) -> dict[str, bytes]:
        raw: Any = await self._guard(lambda: self._redis.hgetall(self.keys.retained))
        return {_text(topic): self._open(frame) for topic, frame in raw.items()}

    async def save_retained(self, changes: dict[str, bytes | None]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for topic, frame in changes.items():
            if frame is None:
                pipe.hdel(self.keys.retained, topic)
            else:
                pipe.hset(self.keys.retained, topic, self._seal(frame))
        await self._guard(pipe.execute)

    async def save_telemetry(self, drones: dict[str, tuple[bytes, int]]) -> None:
        """Every drone's last telemetry: one script call however many drones (once a second)."""
        params: list[Any] = [self.keys.prefix, self.retention.drone_state_ttl_s]
        for drone_id, (frame, ts) in drones.items():
            params += [drone_id, self._seal(frame), str(ts)]  # ts a string: Lua prints %.14g
        packed = msgpack.packb(params, use_bin_type=False)
        await self._guard(partial(self._save_telemetry, keys=[], args=[packed]))


class AdminStore:
    """Synchronous access for the CLI: API key registry and revocation."""

    def __init__(self, url: str, namespace: str, cluster: bool = False) -> None:
        self.keys = Keys(namespace, cluster)
        where: dict[str, Any] = {}
        if cluster:  # straight to the master serving the router's slot
            where = dict(zip(("host", "port"), cluster_master(url, namespace)[:2], strict=True))
        options = {**parse_url(url), **where}
        options.pop("connection_class", None)
        self._redis = redis.Redis(
            **options,
            socket_timeout=_TIMEOUT_S,
            socket_connect_timeout=_TIMEOUT_S,
            decode_responses=True,
            retry=SyncRetry(NoBackoff(), 1),
        )

    def _do(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis unavailable: {exc}") from None

    def record_issued(self, key_id: str, drone_id: str, expires_at: float | None = None) -> None:
        record = json.dumps(
            {"drone": drone_id, "issued_at": int(time.time()), "expires_at": expires_at}
        )
        self._do(self._redis.hset, self.keys.issued_keys, key_id, record)

    def revoke(self, key_id: str) -> bool:
        """Revoke a key id; False when it was already revoked. Connections using it close."""
        newly = bool(self._do(self._redis.sadd, self.keys.revoked_keys, key_id))
        self._announce_revoked("key", key_id)
        return newly

    def revoke_token(self, jti: str, expires_at: float) -> bool:
        """Revoke a token by jti until it would have expired anyway (then it is forgotten)."""
        now = time.time()
        self._do(self._redis.zremrangebyscore, self.keys.revoked_tokens, "-inf", now)
        newly = bool(self._do(self._redis.zadd, self.keys.revoked_tokens, {jti: expires_at}))
        self._announce_revoked("token", jti)
        return newly

    def _announce_revoked(self, kind: str, credential: str) -> None:
        self._do(
            lambda: self._redis.xadd(
                self.keys.revocations,
                {"kind": kind, "id": credential},
                maxlen=10_000,
                approximate=True,
            )
        )

    def put_admin(self, name: str, record: Mapping[str, str]) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self.keys.admin(name))
        pipe.hset(self.keys.admin(name), mapping=dict(record))  # type: ignore[arg-type]
        pipe.sadd(self.keys.admins, name)
        self._do(pipe.execute)

    def remove_admin(self, name: str) -> bool:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self.keys.admin(name))
        pipe.srem(self.keys.admins, name)
        removed, _ = self._do(pipe.execute)
        return bool(removed)

    def admin_names(self) -> list[str]:
        return sorted(self._do(self._redis.smembers, self.keys.admins))

    def issued(self) -> dict[str, dict[str, Any]]:
        raw = self._do(self._redis.hgetall, self.keys.issued_keys)
        return {key_id: json.loads(record) for key_id, record in raw.items()}

    def revoked(self) -> set[str]:
        return set(self._do(self._redis.smembers, self.keys.revoked_keys))

    def close(self) -> None:
        self._redis.close()
