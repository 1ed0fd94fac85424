"""The router's controller: creates the ingress and shard actors and reports on them.

Thin, like Ray Serve's controller: it holds the desired shape (how many ingresses and shards) and
the handles, and answers ``status`` and ``cluster_status`` by asking every actor concurrently.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from actors import ray_api
from sentientedge.config import Config

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 5.0


class RouterController:
    def __init__(self, config: Config, ingresses: int, shards: int) -> None:
        self.config = config
        self.shard_names = [ray_api.shard_name(i) for i in range(shards)]
        self.ingress_names = [ray_api.ingress_name(i) for i in range(ingresses)]
        self.shards: dict[str, Any] = {}
        self.ingresses: dict[str, Any] = {}

    async def deploy(self) -> dict[str, Any]:
        """Create every actor and wait until each ingress listens."""
        for name in self.shard_names:
            if name not in self.shards:
                self.shards[name] = ray_api.create_shard(self.config, name, self.shard_names)
        await asyncio.gather(*(ray_api.call(h, "stats") for h in self.shards.values()))
        nodes = ray_api.alive_node_ids()
        for index, name in enumerate(self.ingress_names):
            if name not in self.ingresses:
                node = nodes[index % len(nodes)] if nodes else None
                self.ingresses[name] = ray_api.create_ingress(
                    self.config, name, self.shard_names, node
                )
        started = await asyncio.gather(*(ray_api.call(h, "start") for h in self.ingresses.values()))
        await asyncio.gather(
            *(ray_api.call(h, "warm", self.ingress_names) for h in self.shards.values())
        )
        return {"ingresses": started, "shards": self.shard_names}

    async def _gather(self, handles: dict[str, Any], method: str) -> dict[str, Any]:
        async def one(name: str, handle: Any) -> Any:
            try:
                return await asyncio.wait_for(ray_api.call(handle, method), STATUS_TIMEOUT_S)
            except Exception as exc:  # a dead or restarting actor is reported, not raised
                return {"error": f"{type(exc).__name__}: {exc}"[:200]}

        results = await asyncio.gather(*(one(n, h) for n, h in handles.items()))
        return dict(zip(handles, results, strict=True))

    async def status(self) -> dict[str, Any]:
        ingresses = await self._gather(self.ingresses, "stats")
        shards = await self._gather(self.shards, "stats")
        return {"namespace": self.config.ray_namespace, "ingresses": ingresses, "shards": shards}

    async def cluster_status(self) -> dict[str, Any]:
        status = await self.status()
        drone_lists = await self._gather(self.shards, "drones")
        drones = [
            drone
            for listing in drone_lists.values()
            if isinstance(listing, list)
            for drone in listing
        ]
        ingresses = status["ingresses"]
        return {
            **status,
            "connections": sum(s.get("connections", 0) for s in ingresses.values()),
            "sessions": sum(s.get("sessions", 0) for s in status["shards"].values()),
            "drones_online": sum(1 for d in drones if d["online"]),
            "drones": sorted(drones, key=lambda d: d["drone"]),
            "load": {
                "received": sum(sum(s.get("received", {}).values()) for s in ingresses.values()),
                "delivered": sum(s.get("delivered", 0) for s in ingresses.values()),
                "routed": sum(s.get("routed", 0) for s in status["shards"].values()),
            },
        }

    async def shutdown(self) -> None:
        """Stop the ingresses (closing their connections with 1001), then kill every actor."""
        await self._gather(self.ingresses, "stop")
        for handle in [*self.ingresses.values(), *self.shards.values()]:
            try:
                ray_api.kill(handle)
            except Exception as exc:
                log.warning("kill failed: %s", exc)
        self.ingresses.clear()
        self.shards.clear()
