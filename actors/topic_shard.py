"""The topic-shard actor: owns a slice of the topic space and the virtual actors placed with it.

Thin: routing, sessions' subscriptions, retained messages and the virtual actors are
:class:`sentientedge.routing.ShardCore`; this class adds the I/O: the streams the ingresses open
to it (:class:`sentientedge.streams.StreamListener`; the address is published through Ray) and
the store (Redis) that makes QoS 1 messages durable before they are acknowledged.

A batch from an ingress is handled at once: QoS 0 goes out in the same turn of the event loop,
QoS 1 joins the store queue, which writes everything waiting in one Redis round trip at a time
(so seqs and a drone's online/offline are stored in the order they were handled) and answers
and sends on what was stored. QoS 0 never waits for Redis.

After its process dies, Ray starts the actor again (``max_restarts``) and this constructor runs
anew, with nothing in memory. Recovery has two halves:
- from Redis, before any QoS 1 message is accepted: every stored session's subscriptions that
  this shard routes, retained messages and the last telemetry of its drones;
- from the ingresses: each stream's hello carries this process's ``epoch``; an ingress that sees
  it change registers again what it holds here (QoS 0 routes, connections, sessions) and has
  its sessions look in Redis for messages stored but never sent.
Drones that were online through a process that died meanwhile are then reported offline.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from actors import ray_api
from actors.process import (
    calm_garbage_collector,
    process_stats,
    serve_at_normal_priority,
    serve_metrics,
)
from sentientedge import logs, wire
from sentientedge.archive import TelemetryPolicy
from sentientedge.config import Config
from sentientedge.database import ArchiveWriter, Database
from sentientedge.errors import StoreUnavailable
from sentientedge.metrics import (
    SHARD_COUNTERS,
    SHARD_GAUGES,
    ProcessLabels,
    StatsCollector,
    make_registry,
)
from sentientedge.ring import HashRing
from sentientedge.routing import PUB, BatchResult, ConnectionLimits, PublicationPlan, ShardCore
from sentientedge.store import Store
from sentientedge.streams import StreamListener
from sentientedge.topics import has_wildcard, placement_key
from sentientedge.wire import REPLY, Item

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0
# After a restart, ingresses re-register within a health-check round or two; drones none of
# them holds by then were held by a process that died.
PRESENCE_GRACE_S = 5.0
# A drone with no connection and no news for an hour leaves memory (Redis keeps its last
# telemetry for the admin view and new subscribers after a restart).
DRONE_IDLE_MS = 3_600_000
# An ingress whose stream stays down this long is gone (scaled down, or replaced under another
# name): what waits for it is dropped.
INGRESS_GONE_S = 60.0
# Topic streams written lately are trimmed by age and their time to live renewed this often
# (STREAM_MAX_AGE_S is a day by default: a minute late is nothing, once per batch was a lot).
STREAM_MAINTENANCE_S = 60.0


def _now_ms() -> int:
    return int(time.time() * 1000)


class TopicShard:
    def __init__(self, name: str, config: Config, shards: list[str]) -> None:
        logs.configure(config.log_level, ray_api.node_ip(), name)
        self.name = name
        self.config = config
        self.ring = HashRing(shards)
        self.core = ShardCore(
            name,
            ConnectionLimits(
                config.max_connections_per_drone,
                config.max_connections_per_user,
                config.max_retained_per_drone,
            ),
        )
        assert config.redis_url is not None
        self.store = Store.for_config(config)
        self._pending_retained: dict[str, bytes | None] = {}
        self.store_failures = 0
        self.epoch = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self.niceness = serve_at_normal_priority()
        calm_garbage_collector()
        self.restarted = ray_api.was_restarted()
        self._ready = asyncio.Event()
        self._to_store: list[PublicationPlan] = []
        self._written_topics: set[str] = set()  # QoS 1 streams written since their upkeep
        self._storing: asyncio.Task[None] | None = None
        self._settling: asyncio.Task[None] | None = None
        self._presence_backlog: list[Any] = []
        self.archive: ArchiveWriter | None = None
        if config.database_url is not None:
            self.archive = ArchiveWriter(
                Database(config.database_url, config.db_pool_size, config.key_ring),
                TelemetryPolicy.parse(config.archive_telemetry),
                config.archive_buffer_max,
            )
            self.core.on_routed = self.archive.routed
        config.require_secrets()
        assert config.jwt_secret is not None
        self.streams = StreamListener(
            name,
            self.epoch,
            wire.link_key(config.stream_secret),
            self._from_ingress,
            # Deliveries back to an ingress: all but QoS 0 wait for its ack (a reconnect of the
            # same ingress process gets them again).
            keep=lambda item: item[0] != PUB,
            on_peer_restart=self._ingress_restarted,
        )
        # In Ray, an async actor's constructor runs on its event loop: work can start here.
        loop = asyncio.get_running_loop()
        self._listening = loop.create_task(self._listen())
        self._recovery = loop.create_task(self._recover())
        self._housekeeping = loop.create_task(self._keep_house())
        if self.archive is not None:
            self.archive.start()

    async def _listen(self) -> dict[str, Any]:
        path = ray_api.stream_socket_path(self.config.ray_namespace, self.name, self.epoch)
        node = ray_api.node_ip()
        registry = make_registry(
            StatsCollector(
                ProcessLabels(node, self.name), self._metrics, SHARD_COUNTERS, SHARD_GAUGES
            )
        )
        self._metrics_server, self._metrics_address = await serve_metrics(registry, node)
        return await self.streams.start(path, node)

    def _metrics(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.core.stats()
        stats.update(process_stats())
        stats["store_failures"] = self.store_failures
        stats["store_backlog"] = len(self._to_store)
        if self.archive is not None:
            stats.update({f"archive_{k}": v for k, v in self.archive.stats().items()})
        return stats

    async def metrics_address(self) -> str:
        """Where Prometheus scrapes this process (``host:port``)."""
        await asyncio.shield(self._listening)
        return self._metrics_address

    async def stream_address(self) -> dict[str, Any]:
        """Where the ingresses open their streams to this shard (changes with every restart)."""
        return await asyncio.shield(self._listening)

    async def _recover(self) -> None:
        """Load from Redis what this shard needs before it may accept QoS 1 messages."""
        while True:
            try:
                if self.restarted:
                    # Ray restarts a process with the arguments it was created with: the ring
                    # may have changed since (a reshard); the controller keeps it in Redis.
                    shape = await self.store.shape()
                    if shape and self.name in shape.get("shards", ()):
                        self.ring = HashRing(shape["shards"])
                await self._load()
                break
            except StoreUnavailable as exc:
                log.warning("%s: recovery waits for the store: %s", self.name, exc)
            except Exception:  # never give up recovering: QoS 1 depends on it
                log.exception("%s: recovery failed, trying again", self.name)
            await asyncio.sleep(1.0)
        self._ready.set()
        if self.restarted:
            await asyncio.sleep(PRESENCE_GRACE_S)
            self._finish(self._presence_result(self.core.reconcile_presence(_now_ms())))

    async def _load(self) -> None:
        mine = self._owns
        for topic, frame in (await self.store.retained()).items():
            # Not over a change made here and not saved yet (a retained message cleared).
            if mine(placement_key(topic)) and topic not in self._pending_retained:
                self.core.retained.setdefault(topic, frame)
        for drone_id, (frame, ts) in (await self.store.telemetry()).items():
            if mine(f"drone/{drone_id}"):
                self.core.restore_telemetry(drone_id, frame, ts)
        now = _now_ms()
        for sid, principal, ingress, filters in await self.store.sessions():
            routed = [f for f in filters if has_wildcard(f) or mine(placement_key(f))]
            if routed:
                self.core.restore_session(sid, principal, ingress, routed, now)

    def _owns(self, key: str) -> bool:
        return self.ring.owner(key) == self.name

    @staticmethod
    def _presence_result(plans: list[Any]) -> BatchResult:
        result = BatchResult()
        result.durable.extend(plans)
        return result

    async def _keep_house(self) -> None:
        ttl_ms = self.config.session_ttl * 1000
        last_upkeep = time.monotonic()
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                now = _now_ms()
                if time.monotonic() - last_upkeep >= STREAM_MAINTENANCE_S and self._written_topics:
                    topics, self._written_topics = self._written_topics, set()
                    last_upkeep = time.monotonic()
                    try:
                        await self.store.maintain_streams(sorted(topics))
                    except StoreUnavailable:
                        self._written_topics |= topics
                        raise
                self.core.actors.expire_sessions(now, ttl_ms)
                # A minute's grace past the TTL: Redis expires the session first, so a publish
                # in between finds it gone (-1) rather than racing its expiry.
                self.core.expire_session_routes(now, ttl_ms + 60_000)
                await self.save_state()
                if self._presence_backlog and self._ready.is_set():
                    backlog, self._presence_backlog = self._presence_backlog, []
                    self._finish(self._presence_result(backlog))
                self.core.actors.evict_idle_drones(now, DRONE_IDLE_MS)
                for ingress in self.streams.expire(INGRESS_GONE_S):
                    log.info("%s: %s gone, its stream dropped", self.name, ingress)
            except StoreUnavailable as exc:
                log.warning("%s: store unavailable: %s", self.name, exc)
            except Exception:  # housekeeping must outlive any one failure
                log.exception("%s: housekeeping failed", self.name)

    def _from_ingress(self, ingress: str, items: list[Item]) -> None:
        """A batch from an ingress's stream, handled in the turn it arrived."""
        # A QoS 1 message is planned for every session subscribed now: until this shard knows
        # them all (recovery), QoS 1 is answered "unavailable" (nothing stored; the publisher
        # sends the same id again) while QoS 0 and everything else goes on.
        self._finish(self.core.handle(ingress, items, _now_ms()))

    def _ingress_restarted(self, ingress: str) -> None:
        """``ingress``'s process was replaced: what its previous process held is gone."""
        log.warning(
            "%s: %s restarted; forgetting what its previous process held", self.name, ingress
        )
        self._finish(self.core.forget_ingress(ingress, _now_ms()))

    def _finish(self, result: BatchResult) -> None:
        """Send what is routed and answer what can be answered now; queue what must be stored."""
        self._send(result)
        if result.retained_changes:
            self._pending_retained.update(result.retained_changes)
        if result.durable:
            self._to_store.extend(result.durable)
            if self._storing is None:
                self._storing = asyncio.get_running_loop().create_task(self._store_queued())

    async def _store_queued(self) -> None:
        """Store everything queued in one round trip, answer and send it on; again while more
        queued meanwhile. One round trip at a time keeps the order things were handled in."""
        try:
            while self._to_store:
                plans, self._to_store = self._to_store, []
                self._send(await self._store(plans))
        finally:
            self._storing = None
        # Nothing more to store: finish, beside whatever comes next, what the next batch would
        # have carried (on a Redis Cluster, dedupe records marking acknowledged messages done).
        if self.store.unsettled and (self._settling is None or self._settling.done()):
            self._settling = asyncio.get_running_loop().create_task(self.store.settle())

    async def _store(self, plans: list[PublicationPlan]) -> BatchResult:
        result = BatchResult()
        if not self._ready.is_set():
            # Presence from a recovering shard waits for it (retried); QoS 1 is refused.
            self._presence_backlog.extend(p for p in plans if p.request_id is None)
            for plan in plans:
                if plan.request_id is not None and plan.ingress is not None:
                    answer = ("unavailable", "shard recovering")
                    result.replies.append((plan.ingress, plan.request_id, answer))
            return result
        try:
            outcomes: list[Any] = await self.store.publish([p.publication for p in plans])
        except StoreUnavailable as exc:
            outcomes = [exc] * len(plans)
        for plan, outcome in zip(plans, outcomes, strict=True):
            if isinstance(outcome, StoreUnavailable):
                self.store_failures += 1
                if plan.request_id is not None and plan.ingress is not None:
                    answer = ("unavailable", str(outcome))
                    result.replies.append((plan.ingress, plan.request_id, answer))
                else:  # presence: tried again until Redis takes it
                    self._presence_backlog.append(plan)
            else:
                self.core.stored(plan, outcome, result)
                publication = plan.publication
                self._written_topics.add(publication.topic)
                if self.archive is not None and not outcome.duplicate:
                    self.archive.stored(
                        publication.topic, publication.frame, publication.principal, outcome.offset
                    )
        return result

    def _send(self, result: BatchResult) -> None:
        """Deliveries first, then replies: a new subscriber's retained messages reach its
        ingress before the answer to its subscription."""
        end = self.streams.end
        for destination, items in result.deliveries.items():
            if items:
                end(destination).extend(items)
        result.deliveries.clear()
        for ingress, request_id, answer in result.replies:
            end(ingress).push((REPLY, request_id, answer), control=True)
        result.replies.clear()

    # Resharding: the controller's steps around the ingresses' (actors/controller.py)

    async def adopt_ring(self, shards: list[str]) -> dict[str, Any]:
        """Route by ``shards`` from now on, and load from Redis what it gives this shard:
        sessions away from every ingress, retained messages, drones' last telemetry."""
        await self._ready.wait()
        self.ring = HashRing(shards)
        await self._load()
        return {"shard": self.name, "retained": len(self.core.retained)}

    async def save_state(self) -> dict[str, int]:
        """Write to Redis what changed: drones' last telemetry and retained messages.
        Housekeeping does it every second; a reshard calls it so that the next owner of a
        range loads the latest."""
        telemetry = self.core.take_dirty_telemetry()
        if telemetry:
            await self.store.save_telemetry(telemetry)
        changes, self._pending_retained = self._pending_retained, {}
        if changes:
            try:
                await self.store.save_retained(changes)
            except StoreUnavailable:
                self._pending_retained = {**changes, **self._pending_retained}
                raise
        return {"retained": len(changes), "telemetry": len(telemetry)}

    async def release_unowned(self) -> dict[str, int]:
        """Forget what the ring in force gives to other shards."""
        return self.core.release(self._owns)

    async def ready(self) -> bool:
        await self._ready.wait()
        return True

    async def ping(self) -> str:
        """This process's incarnation, for the controller's failover watch."""
        return self.epoch

    async def stats(self) -> dict[str, Any]:
        stats = self.core.stats()
        stats.update(process_stats())
        stats["niceness"] = self.niceness
        stats["node"] = ray_api.node_of_current_actor()
        stats["lost_to_ingress"] = sum(end.lost_items for end in self.streams.ends.values())
        stats["links"] = {peer: end.stats() for peer, end in self.streams.ends.items()}
        stats["store_failures"] = self.store_failures
        if self.archive is not None:
            stats["archive"] = self.archive.stats()
        stats["epoch"] = self.epoch
        stats["ready"] = self._ready.is_set()
        stats["started_at"] = self.started_at
        return stats

    async def drones(self) -> list[dict[str, Any]]:
        return self.core.drone_snapshots()
