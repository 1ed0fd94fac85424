"""The ingress actor: one WebSocket server process on ``PORT`` (shared by SO_REUSEPORT).

Thin: the server is :class:`sentientedge.server.IngressServer`; this class wires it to the shards
through Ray and receives their deliveries. It starts serving from its constructor, so a process
that Ray starts again after a crash (``max_restarts``) serves again without being asked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from actors import ray_api
from actors.process import process_stats
from sentientedge.channel import CallPacer
from sentientedge.config import Config
from sentientedge.server import IngressServer, ShardLinks
from sentientedge.store import Store

log = logging.getLogger(__name__)

FORGET_TIMEOUT_S = 30.0
RESTART_PAUSE_S = 2.0


class Ingress:
    def __init__(self, name: str, config: Config, shards: list[str]) -> None:
        self.name = name
        self.config = config
        self.shard_names = shards
        self.server: IngressServer | None = None
        self.started_at = time.time()
        # In Ray, an async actor's constructor runs on its event loop: serve from here.
        self._starting = asyncio.get_running_loop().create_task(self._start())

    async def start(self) -> dict[str, Any]:
        """Wait until the WebSocket server listens; calling it again is harmless."""
        await asyncio.shield(self._starting)
        return {
            "ingress": self.name,
            "port": self.config.port,
            "node": ray_api.node_of_current_actor(),
        }

    async def ping(self) -> str:
        """This process's incarnation, for the controller's failover watch."""
        await asyncio.shield(self._starting)
        return f"{os.getpid()}-{self.started_at}"

    async def _forget_me(self, shard: str) -> None:
        forget = ray_api.caller(self.config.ray_namespace, shard, "forget_ingress")
        deadline = time.monotonic() + FORGET_TIMEOUT_S
        while True:
            try:
                await forget(self.name)
                return
            except Exception as exc:
                if time.monotonic() > deadline:  # a shard that is down learns it on restart
                    log.warning("%s: %s did not hear of the restart: %s", self.name, shard, exc)
                    return
                await asyncio.sleep(0.2)

    async def _start(self) -> None:
        try:
            await self._open()
        except Exception:
            # A process that cannot serve (its port taken, say) is no use alive: it exits, and
            # Ray starts another after a pause (max_restarts).
            log.exception("%s could not start; its process exits to be restarted", self.name)
            await asyncio.sleep(RESTART_PAUSE_S)
            ray_api.exit_process()

    async def _open(self) -> None:
        if self.server is None:
            namespace = self.config.ray_namespace
            links = ShardLinks(
                self.shard_names,
                lambda shard: ray_api.batch_sender(namespace, shard, "from_ingress", self.name),
                CallPacer(self.config.batch_calls_per_s),
            )
            assert self.config.redis_url is not None
            server = IngressServer(
                self.config,
                self.name,
                links,
                Store(self.config.redis_url, namespace, self.config.retention),
                ray_api.caller(namespace, ray_api.CONTROLLER, "cluster_status"),
                ray_api.caller(namespace, ray_api.CONTROLLER, "failover_state"),
            )
            # Whatever a previous process of this ingress held (it restarted) is gone: its drones
            # go offline, its routes go. Every shard must hear it before this one serves again.
            await asyncio.gather(*(self._forget_me(shard) for shard in self.shard_names))
            # A shard that is not up yet is warmed by the first real batch instead.
            await asyncio.gather(
                *(channel.warm() for channel in links.channels()), return_exceptions=True
            )
            await server.start()
            self.server = server

    async def deliver(self, shard: str, batch: bytes) -> None:
        if self.server is not None:
            self.server.deliver(ray_api.unpack_batch(batch))

    async def stats(self) -> dict[str, Any]:
        if self.server is None:
            return {"ingress": self.name, "started": False}
        stats = self.server.stats()
        stats.update(process_stats())
        stats["node"] = ray_api.node_of_current_actor()
        return stats

    async def health(self) -> dict[str, Any]:
        return self.server.health() if self.server is not None else {"status": "starting"}

    async def drain(self) -> dict[str, Any]:
        """Stop accepting connections, then close the open ones with 1012 (resume elsewhere)."""
        await asyncio.shield(self._starting)
        assert self.server is not None
        return await self.server.drain()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None
