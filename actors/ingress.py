"""The ingress actor: one WebSocket server process on ``PORT`` (shared by SO_REUSEPORT).

Thin: the server is :class:`sentientedge.ingress.server.IngressServer`; this class gives it the
shards' stream addresses through Ray (the streams themselves carry the messages, both ways). It
starts serving from its constructor, so a process that Ray starts again after a crash
(``max_restarts``) serves again without being asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
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
from sentientedge.config import Config
from sentientedge.errors import StoreUnavailable
from sentientedge.ingress.links import ShardLinks
from sentientedge.ingress.server import IngressServer
from sentientedge.metrics import merge_expositions
from sentientedge.store import Store

log = logging.getLogger(__name__)

# A restarted ingress waits this long for every shard's stream before it serves: each shard,
# on the hello of this new process, forgets what the previous one held (its drones go offline).
# A shard that is down longer learns it when it is back (it starts afresh anyway).
LINKS_TIMEOUT_S = 30.0
RESTART_PAUSE_S = 2.0


METRICS_TIMEOUT_S = 5.0


async def _scrape(address: str) -> str | None:
    """One process's ``/metrics``, or None if it does not answer in time (restarting, say)."""
    host, _, port = address.rpartition(":")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port)), METRICS_TIMEOUT_S
        )
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: router\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), METRICS_TIMEOUT_S)
        writer.close()
    except (OSError, asyncio.TimeoutError):
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    return body.decode() if head.startswith(b"HTTP/1.1 200") else None


class Ingress:
    def __init__(self, name: str, config: Config, shards: list[str]) -> None:
        self.name = name
        self.config = config.for_node(ray_api.node_labels())
        self.shard_names = shards
        self.server: IngressServer | None = None
        self.started_at = time.time()
        logs.configure(config.log_level, ray_api.node_ip(), name)
        self._metrics_targets = ray_api.caller(
            config.ray_namespace, ray_api.CONTROLLER, "metrics_targets"
        )
        self.niceness = serve_at_normal_priority()
        calm_garbage_collector()
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
            config = self.config
            config.require_secrets()
            assert config.redis_url is not None and config.jwt_secret is not None
            namespace = config.ray_namespace
            store = Store.for_config(config)
            if ray_api.was_restarted():
                # Restarted with its creation's arguments: the ring may have changed since.
                with contextlib.suppress(StoreUnavailable):
                    shape = await store.shape()
                    if shape and shape.get("shards"):
                        self.shard_names = shape["shards"]
            links = ShardLinks(
                self.name,
                uuid.uuid4().hex[:12],
                self.shard_names,
                lambda shard: ray_api.stream_resolver(namespace, shard),
                wire.link_key(config.stream_secret),
                lambda items: server.deliver(items),
            )
            server = IngressServer(
                config,
                self.name,
                links,
                store,
                ray_api.caller(namespace, ray_api.CONTROLLER, "cluster_status"),
                ray_api.caller(namespace, ray_api.CONTROLLER, "failover_state"),
                ray_api.caller(namespace, ray_api.CONTROLLER, "request_scaling"),
                node=ray_api.node_ip(),
                all_metrics=self._all_metrics,
                metrics_targets=self._metrics_targets,
            )
            connected = await links.connect(LINKS_TIMEOUT_S)
            for shard, up in connected.items():
                if not up:
                    log.warning("%s: no stream to %s yet; serving without it", self.name, shard)
            await server.start()
            self._metrics_server, self._metrics_address = await serve_metrics(
                server.registry, ray_api.node_ip()
            )
            self.server = server

    async def metrics_address(self) -> str:
        """Where Prometheus scrapes this process (``host:port``)."""
        await asyncio.shield(self._starting)
        return self._metrics_address

    async def _all_metrics(self) -> bytes:
        """Every router process's metrics in one exposition (``GET /metrics`` on the port)."""
        targets = await asyncio.wait_for(self._metrics_targets(), METRICS_TIMEOUT_S)
        addresses = [address for group in targets for address in group["targets"]]
        texts = await asyncio.gather(*(_scrape(address) for address in addresses))
        return merge_expositions([text for text in texts if text is not None])

    async def stats(self) -> dict[str, Any]:
        if self.server is None:
            return {"ingress": self.name, "started": False}
        stats = self.server.stats()
        stats.update(process_stats())
        stats["niceness"] = self.niceness
        stats["node"] = ray_api.node_of_current_actor()
        return stats

    async def health(self) -> dict[str, Any]:
        return self.server.health() if self.server is not None else {"status": "starting"}

    async def drain(self) -> dict[str, Any]:
        """Stop accepting connections, then close the open ones with 1012 (resume elsewhere)."""
        await asyncio.shield(self._starting)
        assert self.server is not None
        return await self.server.drain()

    async def announce_ring(self, shards: list[str]) -> dict[str, Any]:
        """Reshard, step 1: connect to the next ring's shards, register there."""
        await asyncio.shield(self._starting)
        assert self.server is not None
        self.shard_names = shards
        return await self.server.announce_ring(shards)

    async def take_over_ring(self) -> dict[str, Any]:
        """Reshard, step 2: route by the announced ring."""
        assert self.server is not None
        return await self.server.take_over_ring()

    async def finish_ring(self) -> dict[str, Any]:
        """Reshard, step 3: close the streams to shards that left the ring."""
        assert self.server is not None
        return await self.server.finish_ring()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None
