"""The topic-shard actor: owns a slice of the topic space and the virtual actors placed with it.

Thin: routing and the virtual actors are :class:`sentientedge.routing.ShardCore`; this class adds
the channels back to the ingresses and answers status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from actors import ray_api
from actors.process import process_stats
from sentientedge.channel import CallPacer, Channel
from sentientedge.config import Config
from sentientedge.routing import ConnectionLimits, Reply, ShardCore

log = logging.getLogger(__name__)


class TopicShard:
    def __init__(self, name: str, config: Config) -> None:
        self.name = name
        self.config = config
        self.core = ShardCore(
            name,
            ConnectionLimits(config.max_connections_per_drone, config.max_connections_per_user),
        )
        self._to_ingress: dict[str, Channel] = {}
        self._pacer = CallPacer(config.batch_calls_per_s)
        self._housekeeping: asyncio.Task[None] | None = None

    def _channel(self, ingress: str) -> Channel:
        found = self._to_ingress.get(ingress)
        if found is None:
            send = ray_api.batch_sender(self.config.ray_namespace, ingress, "deliver", self.name)
            found = self._to_ingress[ingress] = Channel(ingress, send, pacer=self._pacer)
        return found

    async def _expire_sessions(self) -> None:
        ttl_ms = self.config.session_ttl * 1000
        while True:
            await asyncio.sleep(min(10.0, self.config.session_ttl / 2))
            self.core.actors.expire_sessions(int(time.time() * 1000), ttl_ms)

    async def from_ingress(self, ingress: str, batch: bytes) -> list[Reply]:
        if self._housekeeping is None:  # an actor's event loop exists only once it is called
            self._housekeeping = asyncio.get_running_loop().create_task(self._expire_sessions())
        result = self.core.handle(ingress, ray_api.unpack_batch(batch), int(time.time() * 1000))
        for destination, messages in result.deliveries.items():
            self._channel(destination).extend(messages)
        return result.replies

    async def warm(self, ingresses: list[str]) -> None:
        """Open the channels to every ingress before traffic needs them."""
        await asyncio.gather(*(self._channel(name).warm() for name in ingresses))

    async def forget_ingress(self, ingress: str) -> None:
        self.core.forget_ingress(ingress, int(time.time() * 1000))
        channel = self._to_ingress.pop(ingress, None)
        if channel is not None:
            await channel.close()

    async def stats(self) -> dict[str, Any]:
        stats = self.core.stats()
        stats.update(process_stats())
        stats["node"] = ray_api.node_of_current_actor()
        stats["lost_to_ingress"] = sum(c.items_lost for c in self._to_ingress.values())
        return stats

    async def drones(self) -> list[dict[str, Any]]:
        return self.core.drone_snapshots()
