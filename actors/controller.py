"""The router's controller: creates the ingress and shard actors, watches them, reports on them.

Thin, like Ray Serve's controller: it holds the desired shape (how many ingresses and shards)
and reconciles the actual one towards it in a loop, each step guarded so one failure never stops
the loop. Ray restarts a dead actor by itself (``max_restarts``); the controller notices, keeps
the failover events (``sentientedge.failover``), and creates what is missing altogether.

If the controller's own process dies, Ray restarts it too: it finds its actors again by name.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from actors import ray_api
from sentientedge.config import Config
from sentientedge.failover import (
    PROBE_INTERVAL_S,
    PROBE_TIMEOUT_S,
    FailoverEvent,
    FailoverTracker,
)

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 5.0


class RouterController:
    def __init__(
        self, config: Config, ingresses: int, shards: int, roles: ray_api.ActorRoles
    ) -> None:
        self.config = config
        self.roles = roles
        self.shard_names = [ray_api.shard_name(i) for i in range(shards)]
        self.ingress_names = [ray_api.ingress_name(i) for i in range(ingresses)]
        self.shards: dict[str, Any] = {}
        self.ingresses: dict[str, Any] = {}
        self.failovers = FailoverTracker()
        self._deployed = asyncio.Event()
        self._nodes: dict[str, bool] = {}
        # In Ray, an async actor's constructor runs on its event loop: the loop starts here, and
        # again after a restart of this process.
        self._loop = asyncio.get_running_loop().create_task(self._reconcile_forever())

    async def deploy(self) -> dict[str, Any]:
        """Create every actor (or adopt it, after a restart) and wait until each ingress listens."""
        namespace = self.config.ray_namespace
        for name in self.shard_names:
            if name not in self.shards:
                found = ray_api.find_actor(name, namespace)
                self.shards[name] = found or ray_api.create_shard(
                    self.roles.shard, self.config, name, self.shard_names
                )
        await asyncio.gather(*(ray_api.call(h, "ping") for h in self.shards.values()))
        nodes = ray_api.alive_node_ids()
        for index, name in enumerate(self.ingress_names):
            if name not in self.ingresses:
                found = ray_api.find_actor(name, namespace)
                node = nodes[index % len(nodes)] if nodes else None
                self.ingresses[name] = found or ray_api.create_ingress(
                    self.roles.ingress, self.config, name, self.shard_names, node
                )
        started = await asyncio.gather(*(ray_api.call(h, "start") for h in self.ingresses.values()))
        self._deployed.set()
        return {"ingresses": started, "shards": self.shard_names}

    async def _reconcile_forever(self) -> None:
        if ray_api.was_restarted():
            await self._adopt()
        await self._deployed.wait()
        while True:
            try:
                await self._probe_all()
            except Exception:  # the loop outlives any one failure
                log.exception("reconcile round failed")
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def _adopt(self) -> None:
        """After a restart of this process: find the actors again (they outlive it)."""
        while True:
            try:
                await self.deploy()
                return
            except Exception as exc:
                log.warning("controller restart: adopting actors failed: %s", exc)
                await asyncio.sleep(1.0)

    async def _probe_all(self) -> None:
        async def probe(name: str, kind: str, handle: Any) -> bool:
            try:
                incarnation = await asyncio.wait_for(ray_api.call(handle, "ping"), PROBE_TIMEOUT_S)
            except Exception:
                self.failovers.observe(name, kind, ok=False)
                return False
            self._log(self.failovers.observe(name, kind, ok=True, incarnation=incarnation))
            return True

        answers = await asyncio.gather(
            *(probe(n, "shard", h) for n, h in self.shards.items()),
            *(probe(n, "ingress", h) for n, h in self.ingresses.items()),
        )
        for node_id, alive in (await ray_api.node_liveness()).items():
            name = f"node-{node_id[:12]}"
            if alive:
                self.failovers.observe(name, "node", ok=True, incarnation=node_id)
            elif self._nodes.get(node_id):
                log.warning("failover: node %s lost", node_id[:12])
                self.failovers.observe(name, "node", ok=False)
            self._nodes[node_id] = alive
        if all(answers):
            # A lost node's event ends once every actor it held answers again from elsewhere.
            for name in self.failovers.recovering:
                if name.startswith("node-"):
                    self._log(self.failovers.observe(name, "node", ok=True, incarnation=name))

    @staticmethod
    def _log(event: FailoverEvent | None) -> None:
        if event is not None:
            log.warning(
                "failover: %s %s noticed after %.2f s, serving again after %.2f s",
                event.kind,
                event.actor,
                event.detected_s,
                event.recovered_s,
            )

    async def failover_state(self) -> dict[str, Any]:
        return self.failovers.summary()

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
            "failover": self.failovers.summary(),
        }

    async def drain(self, ingress: str, restart: bool = False) -> dict[str, Any]:
        """Drain one ingress: no new connections, the open ones closed with 1012 to resume
        elsewhere. With ``restart`` its process is then replaced (an upgrade)."""
        handle = self.ingresses[ingress]
        before = await ray_api.call(handle, "ping")
        report = await ray_api.call(handle, "drain")
        if restart:
            ray_api.restart(handle)
            await self._wait_serving(ingress, before)
        return report

    async def rolling_restart(self) -> list[dict[str, Any]]:
        """Drain and replace every ingress, one at a time, each back before the next goes."""
        return [await self.drain(name, restart=True) for name in self.ingress_names]

    async def _wait_serving(self, ingress: str, old: str, timeout: float = 60.0) -> None:
        """Until a new process of ``ingress`` (not ``old``) serves."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                now = await asyncio.wait_for(ray_api.call(self.ingresses[ingress], "ping"), 10.0)
                if now != old:
                    return
            except Exception:
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{ingress} did not come back within {timeout:.0f} s")

    async def shutdown(self) -> None:
        """Stop the ingresses (closing their connections with 1001), then kill every actor."""
        self._loop.cancel()
        await self._gather(self.ingresses, "stop")
        for handle in [*self.ingresses.values(), *self.shards.values()]:
            try:
                ray_api.kill(handle)
            except Exception as exc:
                log.warning("kill failed: %s", exc)
        self.ingresses.clear()
        self.shards.clear()
