"""The topic-shard actor: owns a slice of the topic space and the virtual actors placed with it.

Thin: routing, sessions' subscriptions, retained messages and the virtual actors are
:class:`sentientedge.routing.ShardCore`; this class adds the I/O: the channels back to the
ingresses and the store (Redis) that makes QoS 1 messages durable before they are acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

from actors import ray_api
from actors.process import process_stats
from sentientedge.channel import CallPacer, Channel
from sentientedge.config import Config
from sentientedge.errors import StoreUnavailable
from sentientedge.ring import HashRing
from sentientedge.routing import BatchResult, ConnectionLimits, Reply, ShardCore
from sentientedge.store import Store
from sentientedge.topics import placement_key

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0


def _now_ms() -> int:
    return int(time.time() * 1000)


class TopicShard:
    def __init__(self, name: str, config: Config, shards: list[str]) -> None:
        self.name = name
        self.config = config
        self.ring = HashRing(shards)
        self.core = ShardCore(
            name,
            ConnectionLimits(config.max_connections_per_drone, config.max_connections_per_user),
        )
        assert config.redis_url is not None
        self.store = Store(config.redis_url, config.ray_namespace, config.retention)
        self._to_ingress: dict[str, Channel] = {}
        self._pacer = CallPacer(config.batch_calls_per_s)
        self._housekeeping: asyncio.Task[None] | None = None
        self._retained_loaded = False
        self._pending_retained: dict[str, bytes | None] = {}
        self.store_failures = 0

    def _channel(self, ingress: str) -> Channel:
        found = self._to_ingress.get(ingress)
        if found is None:
            send = ray_api.batch_sender(self.config.ray_namespace, ingress, "deliver", self.name)
            found = self._to_ingress[ingress] = Channel(ingress, send, pacer=self._pacer)
        return found

    def _start(self) -> None:
        # An async actor's event loop exists only once a method runs, so tasks start here.
        if self._housekeeping is None:
            self._housekeeping = asyncio.get_running_loop().create_task(self._keep_house())

    async def _keep_house(self) -> None:
        ttl_ms = self.config.session_ttl * 1000
        while True:
            try:
                if not self._retained_loaded:
                    await self._load_retained()
                self.core.actors.expire_sessions(_now_ms(), ttl_ms)
                # A minute's grace past the TTL: Redis expires the session first, so a publish
                # in between finds it gone (-1) rather than racing its expiry.
                self.core.expire_session_routes(_now_ms(), ttl_ms + 60_000)
                telemetry = self.core.take_dirty_telemetry()
                if telemetry:
                    await self.store.save_telemetry(telemetry)
                if self._pending_retained:
                    changes, self._pending_retained = self._pending_retained, {}
                    await self.store.save_retained(changes)
            except StoreUnavailable as exc:
                log.warning("%s: store unavailable: %s", self.name, exc)
            except Exception:  # housekeeping must outlive any one failure
                log.exception("%s: housekeeping failed", self.name)
            await asyncio.sleep(FLUSH_INTERVAL_S)

    async def _load_retained(self) -> None:
        stored = await self.store.retained()
        for topic, frame in stored.items():
            if self.ring.owner(placement_key(topic)) == self.name:
                self.core.retained.setdefault(topic, frame)
        self._retained_loaded = True

    async def from_ingress(self, ingress: str, batch: bytes) -> list[Reply]:
        self._start()
        result = self.core.handle(ingress, ray_api.unpack_batch(batch), _now_ms())
        await self._finish(result)
        return result.replies

    async def _finish(self, result: BatchResult) -> None:
        """Send what is routed; store what must be durable, then answer and send that."""
        self._send(result.deliveries)
        if result.retained_changes:
            self._pending_retained.update(result.retained_changes)
        if not result.durable:
            return
        result.deliveries = defaultdict(list)
        plans = result.durable
        try:
            outcomes: list[Any] = await self.store.publish([p.publication for p in plans])
        except StoreUnavailable as exc:
            outcomes = [exc] * len(plans)
        for plan, outcome in zip(plans, outcomes, strict=True):
            if isinstance(outcome, StoreUnavailable):
                self.store_failures += 1
                if plan.request_id is not None:
                    result.replies.append((plan.request_id, ("unavailable", str(outcome))))
                else:
                    log.warning("%s: presence not stored: %s", self.name, outcome)
            else:
                self.core.stored(plan, outcome, result)
        self._send(result.deliveries)

    def _send(self, deliveries: dict[str, list[tuple]]) -> None:
        for destination, items in deliveries.items():
            if items:
                self._channel(destination).extend(items)

    async def warm(self, ingresses: list[str]) -> None:
        """Open the channels to every ingress before traffic needs them."""
        self._start()
        await asyncio.gather(*(self._channel(name).warm() for name in ingresses))

    async def forget_ingress(self, ingress: str) -> None:
        """``ingress`` restarted: what its previous process held is gone."""
        self._start()
        await self._finish(self.core.forget_ingress(ingress, _now_ms()))

    async def stats(self) -> dict[str, Any]:
        stats = self.core.stats()
        stats.update(process_stats())
        stats["node"] = ray_api.node_of_current_actor()
        stats["lost_to_ingress"] = sum(c.items_lost for c in self._to_ingress.values())
        stats["store_failures"] = self.store_failures
        return stats

    async def drones(self) -> list[dict[str, Any]]:
        return self.core.drone_snapshots()
