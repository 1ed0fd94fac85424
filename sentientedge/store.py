"""Everything the router keeps in Redis. The only module that talks to Redis (with
:mod:`sentientedge.redis_cluster`, which finds where each slot is served in a cluster).

Rules for this module:
- Keys start with the namespace so several routers can share one Redis.
- Every Redis failure surfaces as :class:`StoreUnavailable`; callers decide what degrades.
- Each step that must not half-happen (store + dedupe + queue for every session) is one Lua
  script (:mod:`sentientedge.store_scripts`): Redis runs it whole or not at all. On a Redis
  Cluster a QoS 1 message is stored in steps, each one script a node (``Store.publish``).
- Async (redis.asyncio) for the actors, sync helpers for the CLI.

The durable model (QoS 1, PROTOCOL.md "Delivery", "Sessions and resume", "Commands"):

- ``t:{topic}``        stream: every QoS 1 message of a topic; its entry id is the ``offset``
                       in ``puback``. Trimmed by length and age (``STREAM_MAX_LEN``,
                       ``STREAM_MAX_AGE_S``); sessions never read it, so trimming takes
                       nothing a session still needs.
- ``dup:{len}:{who}:{id}`` the offset a publisher's message id got; kept ``DEDUPE_TTL_S``.
- ``s:{sid}``          hash: ``principal``, ``seq`` (last assigned), ``acked``, ``subs``,
                       ``ingress`` (the one that last held it), ``dq_acked`` (the last drone
                       command acked).
- ``sq:{sid}``         stream: the session's unacknowledged QoS 1 messages, entry id
                       ``{seq}-1``; a copy of the frame, so a session owns what it must deliver.
- ``sdq:{sid}``        set: drone-command offsets already copied into this session.
- ``dq:{drone}``       stream: a drone's commands until one of its sessions acks them.
- ``retained``         hash: topic -> the last retained ``msg`` frame.
- ``drone:{id}``       hash: the drone's last telemetry frame and its time.
All session keys expire ``SESSION_TTL`` after the session was last seen.

On a Redis Cluster each of these keys carries its topic, session or drone as its hash tag
(``t:{drone/d1/cmd}``, ``s:{sid}``, ``drone:{d1}``); a drone's command queue is tagged by its
command topic (``dq:{drone/d1/cmd}``) and a retained message is a key of its topic's
(``r:{topic}``) instead of a field of ``retained``. The keys the whole router shares start
with ``{namespace}:``, one slot.
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

from sentientedge import store_scripts as lua
from sentientedge.auth import Identity
from sentientedge.config import Config
from sentientedge.errors import StoreUnavailable
from sentientedge.records import Publication, Retention, SessionRecord, Stored
from sentientedge.redis_cluster import ClusterNodes, cluster_master, key_prefix
from sentientedge.sealing import KeyRing, SealingError, open_stored

log = logging.getLogger(__name__)

_TIMEOUT_S = 2.0
FRAME_CONTEXT = b"se-frame"  # associated data of every sealed frame (sealing.py)
_RETAIN = ("0", "1", "2")  # Publication.retain: keep, set, clear
_POOL_SIZE = 32  # Redis connections per router process
T = TypeVar("T")


class Keys:
    """Every key's name. On a Redis Cluster an entity's keys carry its tag (topic, session,
    drone) so they spread over the masters, and the router's shared keys the namespace's."""

    def __init__(self, namespace: str, cluster: bool = False) -> None:
        self.prefix = namespace  # of an entity's keys; the publish script builds them with it
        self.cluster = cluster
        shared = key_prefix(namespace, cluster)
        self.shared = shared
        self.revoked_keys = f"{shared}:apikeys:revoked"
        self.revoked_tokens = f"{shared}:tokens:revoked"  # zset: jti -> exp
        self.revocations = f"{shared}:revocations"  # stream every ingress follows
        self.issued_keys = f"{shared}:apikeys:issued"
        self.retained = f"{shared}:retained"  # a single Redis's (a cluster: retained_topic)
        self.shape = f"{shared}:shape"
        self.admins = f"{shared}:admins"  # set of enrolled admin names
        self.replication_mark = f"{shared}:replicated"  # bumped before WAIT (Store.publish)

    def _tag(self, name: str) -> str:
        return "{" + name + "}" if self.cluster else name

    def admin(self, name: str) -> str:
        return f"{self.shared}:admin:{name}"

    def login_failures(self, subject: str) -> str:
        return f"{self.shared}:login:{subject}"

    def topic(self, topic: str) -> str:
        return f"{self.prefix}:t:{self._tag(topic)}"

    def retained_topic(self, topic: str) -> str:
        return f"{self.prefix}:r:{self._tag(topic)}"

    def dedupe(self, who: str, msg_id: str, topic: str) -> str:
        # The publisher's length first: ("a:b", "c") and ("a", "b:c") must not share a key.
        # On a cluster the record lives with its topic's stream (a message id is then unique
        # per publisher and topic; on a single Redis per publisher).
        head = f"{self.prefix}:dup:{self._tag(topic)}:" if self.cluster else f"{self.prefix}:dup:"
        return f"{head}{len(who)}:{who}:{msg_id}"

    def session(self, sid: str) -> str:
        return f"{self.prefix}:s:{self._tag(sid)}"

    def session_queue(self, sid: str) -> str:
        return f"{self.prefix}:sq:{self._tag(sid)}"

    def session_commands(self, sid: str) -> str:
        return f"{self.prefix}:sdq:{self._tag(sid)}"

    def drone_commands(self, drone_id: str) -> str:
        if self.cluster:  # with its command topic's stream
            return f"{self.prefix}:dq:{self._tag(f'drone/{drone_id}/cmd')}"
        return f"{self.prefix}:dq:{drone_id}"

    def drone(self, drone_id: str) -> str:
        return f"{self.prefix}:drone:{self._tag(drone_id)}"

    def replication_mark_near(self, key: str) -> str:
        """A counter in the slot of ``key`` (bumped before WAIT on its node)."""
        start = key.find("{")
        tag = key[start : key.index("}", start) + 1] if start >= 0 else ""
        return f"{self.prefix}:replicated:{tag}" if tag else self.replication_mark

    def name_in(self, key: str | bytes, kind: str) -> str:
        """The topic, session or drone a key of ``kind`` ("t", "s", "drone", "r") is for."""
        text = _text(key)[len(self.prefix) + len(kind) + 2 :]
        return text[1:-1] if self.cluster else text


def _session_fields(keys: list[str], pipe: Any, at: int) -> Any:
    return pipe.hmget(keys[at], "principal", "ingress", "subs")


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
        """``cluster``: ``url`` is a node of a Redis Cluster (each key on the master serving
        its slot). ``wait_replicas``: a QoS 1 batch counts as stored once that many replicas
        have it (``WAIT``), so a master's failover cannot lose a puback."""
        self.url = url
        # ENCRYPTION_KEY: every frame is sealed here on its way in and opened on its way out;
        # Lua moves the sealed blobs between keys without reading them.
        self.sealing = sealing
        self.keys = Keys(namespace, cluster)
        self.retention = retention or Retention()
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.nodes: ClusterNodes | None = None
        self._single: aioredis.Redis | None = None
        if cluster:
            self.nodes = ClusterNodes(url, partial(self._client, url))
        else:
            self._single = self._client(url)
        scripts = self._redis  # each script is run with the client of its keys' node
        self._publish: AsyncScript = scripts.register_script(lua.PUBLISH)
        self._topics_step: AsyncScript = scripts.register_script(lua.CLUSTER_TOPICS)
        self._sessions_step: AsyncScript = scripts.register_script(lua.CLUSTER_SESSIONS)
        self._done_step: AsyncScript = scripts.register_script(lua.CLUSTER_DONE)
        self._maintain_streams: AsyncScript = scripts.register_script(lua.MAINTAIN_STREAMS)
        self._save_telemetry: AsyncScript = scripts.register_script(lua.SAVE_TELEMETRY)
        self._ack: AsyncScript = scripts.register_script(lua.ACK)
        self._bind: AsyncScript = scripts.register_script(lua.BIND_COMMANDS)
        self._claim: AsyncScript = scripts.register_script(lua.CLAIM)
        self._touch: AsyncScript = scripts.register_script(lua.TOUCH)
        self._save_subs: AsyncScript = scripts.register_script(lua.SAVE_SUBS)
        self._raise_seq: AsyncScript = scripts.register_script(lua.RAISE_SEQ)
        self._save_admin_login: AsyncScript = scripts.register_script(lua.SAVE_ADMIN_LOGIN)
        self._revoked_cache: set[str] = set()
        # A cluster's QoS 1 messages acknowledged, their dedupe records not yet marked done:
        # (publisher, message id, topic, offset).
        self._unmarked: list[tuple[str, str, str, Any]] = []

    @staticmethod
    def _client(url: str, host: str | None = None, port: int | None = None) -> aioredis.Redis:
        """A client with its own bounded pool: to ``url``, or to one master of its cluster."""
        # A pool that waits for a free connection: a burst of handshakes (each claims or
        # creates its session) must queue, not fail with "too many connections".
        options: dict[str, Any] = dict(parse_url(url))  # a URL's options win in from_url
        if host is not None:
            options.update(host=host, port=port)
        pool = aioredis.BlockingConnectionPool(
            **options,
            max_connections=_POOL_SIZE,
            timeout=_TIMEOUT_S,
            socket_timeout=_TIMEOUT_S,
            socket_connect_timeout=_TIMEOUT_S,
            # redis-py retries a failed command three times with backoff of up to seconds by
            # default. Here a failure must answer at once (QoS 1 publishers hear "unavailable"
            # and retry): one immediate retry on a fresh connection, no backoff.
            retry=Retry(NoBackoff(), 1),
        )
        return aioredis.Redis(connection_pool=pool)

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
        if self.nodes is not None:
            await self.nodes.close()
        if self._single is not None:
            await self._single.aclose(close_connection_pool=True)

    def _on(self, key: str) -> aioredis.Redis:
        """The client of the node serving ``key``."""
        if self.nodes is None:
            assert self._single is not None
            return self._single
        return self.nodes.client(key)

    @property
    def _redis(self) -> aioredis.Redis:
        """The client of the keys the whole router shares (one slot on a cluster)."""
        return self._on(self.keys.revocations)

    def _masters(self) -> list[aioredis.Redis]:
        return [self._on("")] if self.nodes is None else self.nodes.masters()

    def _by_node(self, keys: list[str]) -> dict[aioredis.Redis, list[int]]:
        """Positions of ``keys`` grouped by the node serving them, in order."""
        groups: dict[aioredis.Redis, list[int]] = {}
        for at, key in enumerate(keys):
            groups.setdefault(self._on(key), []).append(at)
        return groups

    async def _each(self, keys: list[str], command: Callable[[Any, int], Any]) -> list[Any]:
        """``command(pipeline, i)`` for every key, one pipeline a node (all at once); the
        results in the keys' order."""
        out: list[Any] = [None] * len(keys)

        async def run(client: aioredis.Redis, positions: list[int]) -> None:
            pipe = client.pipeline(transaction=False)
            for at in positions:
                queued = command(pipe, at)
                if asyncio.iscoroutine(queued):  # a script queued on the pipeline
                    await queued
            for at, value in zip(positions, await pipe.execute(), strict=True):
                out[at] = value

        groups = self._by_node(keys)
        await self._guard(lambda: asyncio.gather(*(run(c, p) for c, p in groups.items())))
        return out

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
            if self.nodes is not None:
                self.nodes.suspect(exc)
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}"[:200]) from None

    async def ping(self) -> bool:
        """Whether Redis answers: on a cluster, every master serving slots (a dead one holds
        some topics' and sessions' keys until its replica takes over)."""

        async def answers(node: aioredis.Redis) -> bool:
            try:
                return bool(await node.ping())
            except (redis.RedisError, OSError) as exc:
                if self.nodes is not None:
                    self.nodes.suspect(exc)
                return False

        return all(await asyncio.gather(*map(answers, self._masters())))

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
        stored = await self._script(self._save_admin_login, [self.keys.admin(name)], args)
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
        """Store a batch of QoS 1 messages in order: on a single Redis one script call, one
        round trip; on a cluster three steps (:meth:`_publish_spread`)."""
        if not publications:
            return []
        if self.nodes is not None:
            return await self._publish_spread(publications)
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
                raw = await self._guard(
                    partial(self._publish, keys=[], args=[packed], client=self._redis)
                )
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
        pipe = self._on(self.keys.replication_mark).pipeline(transaction=False)
        await self._publish(keys=[], args=[packed], client=pipe)
        pipe.incr(self.keys.replication_mark)
        pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
        raw, _, replicas = await pipe.execute()
        return raw, self._enough_replicas(int(replicas))

    def _enough_replicas(self, replicas: int) -> bool:
        if replicas < self.wait_replicas:
            log.warning(
                "QoS 1 batch on %d of %d replicas after %d ms: publishers asked to send again",
                replicas, self.wait_replicas, self.wait_timeout_ms,
            )  # fmt: skip
        return replicas >= self.wait_replicas

    async def _per_node(
        self,
        script: AsyncScript,
        keys: list[str],
        pack: Callable[[aioredis.Redis, list[int]], list[Any]],
        replicate: bool = False,
        groups: dict[aioredis.Redis, list[int]] | None = None,
    ) -> tuple[list[Any], dict[aioredis.Redis, bool]]:
        """``script`` once on each node, for the items whose ``keys`` it serves (``pack`` makes
        its arguments for a node from their positions; ``groups``: the positions by node, when
        known). Each item's result, or the node's failure; and per node whether its replicas
        have it too (``replicate``: ``WAIT`` after the script, on its connection)."""
        out: list[Any] = [None] * len(keys)
        replicated: dict[aioredis.Redis, bool] = {}

        async def run(client: aioredis.Redis, positions: list[int]) -> list[Any]:
            packed = msgpack.packb(pack(client, positions), use_bin_type=False)
            if not (replicate and self.wait_replicas):
                replicated[client] = True
                return await script(keys=[], args=[packed], client=client)
            pipe = client.pipeline(transaction=False)
            await script(keys=[], args=[packed], client=pipe)
            pipe.incr(self.keys.replication_mark_near(keys[positions[0]]))
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            raw, _, replicas = await pipe.execute()
            replicated[client] = self._enough_replicas(int(replicas))
            return raw

        async def guarded(client: aioredis.Redis, positions: list[int]) -> None:
            try:
                raw = await self._guard(partial(run, client, positions))
            except StoreUnavailable as exc:
                raw = [exc] * len(positions)
            for at, value in zip(positions, raw, strict=True):
                out[at] = value

        groups = self._by_node(keys) if groups is None else groups
        await asyncio.gather(*(guarded(c, p) for c, p in groups.items()))
        return out, replicated

    async def _publish_spread(
        self, publications: list[Publication]
    ) -> list[Stored | StoreUnavailable]:
        """A batch on a Redis Cluster, where a message's keys and its recipients' are on
        different nodes: no script can hold them all, so the batch goes in two steps, each one
        script a node, all nodes at once, each followed by ``WAIT`` on its connection:

        1. topics: the stream, the dedupe record marked pending, retained, the drone's command
           queue (``CLUSTER_TOPICS``);
        2. sessions: each recipient's queue (``CLUSTER_SESSIONS``).

        A message is acknowledged after step 2. Its dedupe record is marked done afterwards,
        by the next batch's step 1 on that node or, when none comes, by :meth:`settle` (off
        the path of the puback). A failure at any step answers ``unavailable``: the publisher
        sends again, and a message still pending then goes through step 2 again (a session
        that got it then gets it once, as a rule: see ``CLUSTER_SESSIONS``; at least once in
        any case).
        """
        keys, retention = self.keys, self.retention
        count = len(publications)
        failed: list[StoreUnavailable | None] = [None] * count
        sealed = [self._seal(pub.frame) for pub in publications]
        topic_keys = [keys.topic(pub.topic) for pub in publications]
        topic_nodes = [self._on(key) for key in topic_keys]
        by_topic_node: dict[aioredis.Redis, list[int]] = {}
        for at, node in enumerate(topic_nodes):
            by_topic_node.setdefault(node, []).append(at)
        marks = self._marks_by_node()
        carried: dict[aioredis.Redis, list[Any]] = {}

        def topics_args(node: aioredis.Redis, positions: list[int]) -> list[Any]:
            carried[node] = marks.pop(node, [])
            params: list[Any] = [
                keys.prefix,
                retention.stream_max_len,
                retention.dedupe_ttl_s,
                retention.command_ttl_s,
                retention.command_max_len,
                carried[node],
            ]
            for at in positions:
                pub = publications[at]
                command = ""
                if pub.command_for:
                    command = "1" if any(owner for _, owner in pub.recipients) else "0"
                params += (pub.principal, pub.msg_id, pub.topic, sealed[at],
                           _RETAIN[pub.retain], command)  # fmt: skip
            return params

        # Replicated before any session's queue is written: a failover after step 1 keeps
        # the pending record, so the publisher's retry finishes this message, never stores it
        # anew under another offset beside queues that have it already.
        heads, topics_replicated = await self._per_node(
            self._topics_step, topic_keys, topics_args, replicate=True, groups=by_topic_node
        )
        for node, positions in by_topic_node.items():  # marks a failed node may not have
            if isinstance(heads[positions[0]], StoreUnavailable):
                self._unmarked += carried.get(node, [])
        for left in marks.values():
            self._unmarked += left
        # Step 2's work: (message, session, the drone's own command), grouped by node.
        deliveries: list[tuple[int, str, bool]] = []
        by_session_node: dict[aioredis.Redis, list[int]] = {}
        session_node: dict[str, aioredis.Redis] = {}
        for at, pub in enumerate(publications):
            head = heads[at]
            if isinstance(head, StoreUnavailable):
                failed[at] = head
                continue
            if head[0] == 0:
                continue
            for sid, owner in pub.recipients:
                if sid not in session_node:
                    session_node[sid] = self._on(keys.session(sid))
                by_session_node.setdefault(session_node[sid], []).append(len(deliveries))
                deliveries.append((at, sid, owner))

        def sessions_args(node: aioredis.Redis, positions: list[int]) -> list[Any]:
            frames: dict[int, int] = {}
            queues: dict[int, int] = {}
            refs: list[Any] = []
            for position in positions:
                at, sid, own = deliveries[position]
                if own and publications[at].command_for:
                    refs += (sid, -queues.setdefault(at, len(queues) + 1))
                else:
                    refs += (sid, frames.setdefault(at, len(frames) + 1))
            return [
                keys.prefix,
                retention.session_ttl_s,
                retention.session_queue_max,
                [(sealed[at], publications[at].topic, heads[at][1]) for at in frames],
                [heads[at][2] for at in queues],
                *refs,
            ]

        seqs, sessions_replicated = await self._per_node(
            self._sessions_step, [keys.session(sid) for _, sid, _ in deliveries], sessions_args,
            replicate=True, groups=by_session_node,
        )  # fmt: skip
        per_message: list[list[int]] = [[] for _ in range(count)]
        for (at, _, _), seq in zip(deliveries, seqs, strict=True):
            if isinstance(seq, StoreUnavailable):
                failed[at] = failed[at] or seq
            else:  # a command's own drone: its seq is the last one copied (0: it had them all)
                per_message[at].append(seq if isinstance(seq, int) else (seq[-2] if seq else 0))
        replicated = {**topics_replicated}
        for node, enough in sessions_replicated.items():
            replicated[node] = replicated.get(node, True) and enough
        repeats = [at for at in range(count) if failed[at] is None and heads[at][0] == 0]
        repeats_replicated = True
        if repeats and self.wait_replicas:
            # A repeat of a message whose first attempt may not have reached the replicas:
            # wait on every master, where that attempt wrote.
            repeats_replicated = await self._wait_everywhere()
        all_replicated = all(replicated.values())
        results: list[Stored | StoreUnavailable] = []
        for at, pub in enumerate(publications):
            head, error = heads[at], failed[at]
            if error is not None:
                results.append(error)
                continue
            if head[0] == 0:
                results.append(Stored(_text(head[1]), True, (), repeats_replicated))
                continue
            self._unmarked.append((pub.principal, pub.msg_id, pub.topic, head[1]))
            written = all_replicated or all(
                replicated.get(node, False)
                for node in {topic_nodes[at], *(session_node[sid] for sid, _ in pub.recipients)}
            )
            results.append(Stored(_text(head[1]), False, tuple(per_message[at]), written))
        return results

    def _marks_by_node(self) -> dict[aioredis.Redis, list[Any]]:
        """The dedupe records waiting to say done, by the node serving each now."""
        marks: dict[aioredis.Redis, list[Any]] = {}
        for who, msg_id, topic, offset in self._unmarked:
            marks.setdefault(self._on(self.keys.topic(topic)), []).append(
                (who, msg_id, topic, offset)
            )
        self._unmarked = []
        return marks

    @property
    def unsettled(self) -> bool:
        """Whether :meth:`settle` has work (never on a single Redis)."""
        return bool(self._unmarked)

    async def settle(self) -> None:
        """Mark done the dedupe records no later batch carried (a shard calls this when it has
        nothing else to store). Never raises: what fails waits for the next batch."""
        if not self._unmarked:
            return
        marks = self._marks_by_node()

        async def mark(node: aioredis.Redis, done: list[Any]) -> None:
            packed = msgpack.packb([self.keys.prefix, done], use_bin_type=False)
            try:
                await self._guard(partial(self._done_step, keys=[], args=[packed], client=node))
            except StoreUnavailable:
                self._unmarked += done

        await asyncio.gather(*(mark(node, done) for node, done in marks.items()))

    async def _wait_everywhere(self) -> bool:
        """``WAIT`` on every master (after a counter bump there): whether all have the
        replicas asked for."""
        assert self.nodes is not None

        async def wait(node: aioredis.Redis, key: str) -> bool:
            pipe = node.pipeline(transaction=False)
            pipe.incr(self.keys.replication_mark_near(key))
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            try:
                _, replicas = await self._guard(pipe.execute)
            except StoreUnavailable:
                return False
            return self._enough_replicas(int(replicas))

        masters = self.nodes.a_key_on_each_master()
        return all(await asyncio.gather(*(wait(node, key) for node, key in masters)))

    async def maintain_streams(self, topics: list[str]) -> None:
        """Trim the topics' streams by age and let them live another retention: housekeeping
        for the topics written lately, not work for every batch."""
        retention = self.retention
        if not topics or not retention.stream_max_age_s:
            return
        min_id = f"{int(time.time() * 1000) - retention.stream_max_age_s * 1000}-0"
        streams = [self.keys.topic(topic) for topic in topics]
        outcomes, _ = await self._per_node(
            self._maintain_streams,
            streams,
            lambda _, at: [min_id, retention.stream_max_age_s, *(streams[i] for i in at)],
        )
        for outcome in outcomes:
            if isinstance(outcome, StoreUnavailable):
                raise outcome

    async def create_session(self, sid: str, principal: str, ingress: str) -> None:
        key = self.keys.session(sid)
        pipe = self._on(key).pipeline(transaction=True)
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

    async def _script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """A script whose keys share a slot, on the node serving it."""
        return await self._guard(partial(script, keys=keys, args=args, client=self._on(keys[0])))

    async def claim_session(self, sid: str, principal: str, ingress: str) -> SessionRecord | None:
        """Resume ``sid`` for ``principal``: its record, its keys good for another TTL; or None
        when there is no such session for this principal."""
        args: list[Any] = [principal, ingress, self.retention.session_ttl_s]
        raw: Any = await self._script(self._claim, self._session_keys(sid), args)
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
        await self._script(self._save_subs, [self.keys.session(sid)], args)

    async def touch_sessions(
        self, sessions: dict[str, tuple[str, list[str]]], ingress: str
    ) -> None:
        """Keep held sessions alive another SESSION_TTL: sid -> (principal, subscriptions)."""
        if not sessions:
            return
        ttl = self.retention.session_ttl_s
        held = list(sessions.items())

        def touch(pipe: Any, at: int) -> Any:
            sid, (principal, subscriptions) = held[at]
            args: list[Any] = [principal, ingress, ttl, json.dumps(sorted(subscriptions))]
            return self._touch(keys=self._session_keys(sid), args=args, client=pipe)

        await self._each([self.keys.session(sid) for sid, _ in held], touch)

    async def raise_seqs(self, seqs: dict[str, int]) -> None:
        behind = list(seqs.items())

        def raise_seq(pipe: Any, at: int) -> Any:
            sid, seq = behind[at]
            return self._raise_seq(keys=[self.keys.session(sid)], args=[seq], client=pipe)

        await self._each([self.keys.session(sid) for sid, _ in behind], raise_seq)

    async def session_seqs(self, sids: list[str]) -> dict[str, int]:
        """The last seq stored for each session (a session missing in Redis is left out)."""
        keys = [self.keys.session(sid) for sid in sids]
        values = await self._each(keys, lambda pipe, at: pipe.hget(keys[at], "seq"))
        return {sid: int(v) for sid, v in zip(sids, values, strict=True) if v is not None}

    async def ack(self, sid: str, seq: int, drone_id: str | None) -> int:
        """Acknowledge a session's deliveries up to ``seq``; a drone's acked commands leave
        its command queue (on a cluster a second step: the queue is in its topic's slot)."""
        keys = self.keys
        script_keys = self._session_keys(sid)
        if drone_id and not keys.cluster:
            script_keys.append(keys.drone_commands(drone_id))
        raw = await self._script(self._ack, script_keys, [seq, "1" if drone_id else "0"])
        offsets = [_text(offset) for offset in raw[1:]]
        if drone_id and offsets and keys.cluster:
            queue = keys.drone_commands(drone_id)
            await self._guard(lambda: self._on(queue).xdel(queue, *offsets))
        return int(raw[0])

    async def session_messages(
        self, sid: str, first_seq: int, count: int
    ) -> list[tuple[int, bytes]]:
        """Up to ``count`` queued messages of a session from ``first_seq`` on: (seq, frame)."""
        key = self.keys.session_queue(sid)
        entries: Any = await self._guard(
            lambda: self._on(key).xrange(key, min=f"{first_seq}-0", max="+", count=count)
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
        """The drone subscribed to its command topic: its queued commands it has not had go
        into its session's queue, in order. (seq, frame) of each."""
        keys = self.keys
        queue = keys.drone_commands(drone_id)
        if not keys.cluster:
            raw = await self._script(
                self._bind, [*self._session_keys(sid), queue], [self.retention.session_ttl_s]
            )
        else:  # the queue read on its topic's node, copied on the session's
            entries: Any = await self._guard(lambda: self._on(queue).xrange(queue))
            flat = [item for offset, fields in entries for item in (offset, fields[b"f"])]
            params = [keys.prefix, self.retention.session_ttl_s,
                      self.retention.session_queue_max, [], [flat], sid, -1]  # fmt: skip
            packed = msgpack.packb(params, use_bin_type=False)
            session = keys.session(sid)
            copied = await self._guard(
                partial(self._sessions_step, keys=[], args=[packed], client=self._on(session))
            )
            raw = copied[0] if copied[0] != -1 else []
        return [(int(raw[i]), self._open(raw[i + 1])) for i in range(0, len(raw), 2)]

    async def sessions(self) -> list[tuple[str, str, str, list[str]]]:
        """Every stored session: (id, principal, ingress, subscriptions). For a shard's restart."""
        found = [key async for key in self._scan(self.keys.prefix + ":s:*")]
        out = []
        for start in range(0, len(found), 500):
            chunk = found[start : start + 500]
            fields = partial(_session_fields, chunk)
            records = await self._each(chunk, fields)
            for key, (principal, ingress, subs) in zip(chunk, records, strict=True):
                if principal is not None:
                    sid = self.keys.name_in(key, "s")
                    out.append((sid, _text(principal), _text(ingress), json.loads(subs or b"[]")))
        return out

    async def telemetry(self) -> dict[str, tuple[bytes, int]]:
        """Every drone's last telemetry: drone id -> (frame, ts)."""
        found = [key async for key in self._scan(self.keys.prefix + ":drone:*")]
        records = await self._each(found, lambda pipe, at: pipe.hmget(found[at], "f", "ts"))
        out = {}
        for key, raw in zip(found, records, strict=True):
            if raw[0] is not None:
                out[self.keys.name_in(key, "drone")] = (self._open(raw[0]), int(raw[1] or 0))
        return out

    async def _scan(self, pattern: str) -> Any:
        """Every key matching ``pattern``, on every master."""
        for node in self._masters():
            cursor: Any = 0
            while True:
                page: Any = await self._guard(
                    partial(node.scan, cursor=cursor, match=pattern, count=1000)
                )
                cursor, keys = page
                for key in keys:
                    yield _text(key)
                if int(cursor) == 0:
                    break

    # The router's shape (the controller's; restarted actors read it)

    async def save_shape(self, shape: dict[str, Any]) -> None:
        await self._guard(lambda: self._redis.set(self.keys.shape, json.dumps(shape)))

    async def shape(self) -> dict[str, Any] | None:
        """The ingresses and shards the controller last put in place, if it did."""
        raw: Any = await self._guard(lambda: self._redis.get(self.keys.shape))
        return json.loads(raw) if raw else None

    # Retained messages and last telemetry

    async def retained(self) -> dict[str, bytes]:
        if not self.keys.cluster:
            raw: Any = await self._guard(lambda: self._redis.hgetall(self.keys.retained))
            return {_text(topic): self._open(frame) for topic, frame in raw.items()}
        found = [key async for key in self._scan(self.keys.prefix + ":r:*")]
        frames = await self._each(found, lambda pipe, at: pipe.get(found[at]))
        return {
            self.keys.name_in(key, "r"): self._open(frame)
            for key, frame in zip(found, frames, strict=True)
            if frame is not None
        }

    async def save_retained(self, changes: dict[str, bytes | None]) -> None:
        topics = list(changes)
        keys = self.keys

        def save(pipe: Any, at: int) -> Any:
            topic, frame = topics[at], changes[topics[at]]
            if keys.cluster:
                key = keys.retained_topic(topic)
                return pipe.delete(key) if frame is None else pipe.set(key, self._seal(frame))
            if frame is None:
                return pipe.hdel(keys.retained, topic)
            return pipe.hset(keys.retained, topic, self._seal(frame))

        where = [keys.retained_topic(t) if keys.cluster else keys.retained for t in topics]
        await self._each(where, save)

    async def save_telemetry(self, drones: dict[str, tuple[bytes, int]]) -> None:
        """Every drone's last telemetry: one script call a node however many drones (once a
        second)."""
        keys = [self.keys.drone(drone_id) for drone_id in drones]
        states = list(drones.values())

        def pack(_: aioredis.Redis, positions: list[int]) -> list[Any]:
            params: list[Any] = [self.retention.drone_state_ttl_s]
            for at in positions:
                frame, ts = states[at]
                params += [keys[at], self._seal(frame), str(ts)]  # ts a string: Lua prints %.14g
            return params

        outcomes, _ = await self._per_node(self._save_telemetry, keys, pack)
        for outcome in outcomes:
            if isinstance(outcome, StoreUnavailable):
                raise outcome


class AdminStore:
    """Synchronous access for the CLI: API key registry and revocation."""

    def __init__(self, url: str, namespace: str, cluster: bool = False) -> None:
        self.keys = Keys(namespace, cluster)
        where: dict[str, Any] = {}
        if cluster:  # straight to the master serving the shared keys' slot
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
