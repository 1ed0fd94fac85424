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
import time
from collections import Counter, deque
from typing import Any

from actors import ray_api
from sentientedge.autoscale import (
    Autoscaler,
    CpuMeter,
    Load,
    ScalingDecision,
    ScalingRefused,
)
from sentientedge.config import Config
from sentientedge.errors import StoreUnavailable
from sentientedge.failover import (
    PROBE_INTERVAL_S,
    PROBE_TIMEOUT_S,
    FailoverEvent,
    FailoverTracker,
)
from sentientedge.store import Store

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 5.0
# Each step of a scaling (create, announce, take over, ...) on every actor, at most this long.
SCALING_STEP_TIMEOUT_S = 60.0
SCALING_EVENTS_KEPT = 50


def _index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


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
        assert config.redis_url is not None
        self.store = Store(config.redis_url, config.ray_namespace, config.retention)
        self.autoscaler = Autoscaler(config.scaling_policy, config.scale_window_ms / 1000)
        self.cpu = CpuMeter()
        self.scaling_events: deque[dict[str, Any]] = deque(maxlen=SCALING_EVENTS_KEPT)
        self.scaling_counts: Counter[str] = Counter()
        self._scaling = asyncio.Lock()
        self._scaling_task: asyncio.Task[None] | None = None
        # Samples for the autoscaler: a dozen per window, at most one every 5 s.
        self._sample_every_s = min(5.0, config.scale_window_ms / 1000 / 12)
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
        await self._save_shape()
        self._deployed.set()
        return {"ingresses": started, "shards": self.shard_names}

    async def _reconcile_forever(self) -> None:
        if ray_api.was_restarted():
            await self._adopt()
        await self._deployed.wait()
        loop = asyncio.get_running_loop()
        next_sample = loop.time()
        while True:
            try:
                await self._probe_all()
                if self.config.autoscale and loop.time() >= next_sample:
                    next_sample = loop.time() + self._sample_every_s
                    await self._autoscale()
            except Exception:  # the loop outlives any one failure
                log.exception("reconcile round failed")
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def _adopt(self) -> None:
        """After a restart of this process: find the actors again (they outlive it), in the
        shape last put in place (scaling may have changed it since this process was made)."""
        while True:
            try:
                shape = await self.store.shape()
                if shape:
                    self.shard_names = list(shape["shards"])
                    self.ingress_names = list(shape["ingresses"])
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
        return {**self.failovers.summary(), "scaling_events": dict(self.scaling_counts)}

    # Scaling: an instance is one ingress and one shard (PROTOCOL.md)

    @property
    def instances(self) -> int:
        return len(self.shard_names)

    def _shape(self) -> dict[str, list[str]]:
        return {"shards": list(self.shard_names), "ingresses": list(self.ingress_names)}

    async def _save_shape(self) -> None:
        try:
            await self.store.save_shape(self._shape())
        except StoreUnavailable as exc:  # restarted actors then use their creation's shape
            log.warning("router shape not saved: %s", exc)

    async def _sample(self) -> Load:
        now = time.monotonic()
        ingresses = await self._gather(self.ingresses, "stats")
        shards = await self._gather(self.shards, "stats")

        def busiest(reports: dict[str, Any]) -> float:
            rates = [
                self.cpu.rate(name, report["pid"], report["cpu_s"], now)
                for name, report in reports.items()
                if "cpu_s" in report
            ]
            return max((rate for rate in rates if rate is not None), default=0.0)

        self.cpu.forget(set(ingresses) | set(shards))
        return Load(
            instances=self.instances,
            connections=sum(r.get("connections", 0) for r in ingresses.values()),
            max_connections_per_instance=self.config.max_ws_connections,
            ingress_cpu=busiest(ingresses),
            shard_cpu=busiest(shards),
        )

    async def _autoscale(self) -> None:
        if self._scaling.locked():
            return
        load = await self._sample()
        now = time.monotonic()
        self.autoscaler.observe(load, now)
        decision = self.autoscaler.decide(self.instances, now)
        if decision is not None:
            self._start_scaling(decision)

    async def request_scaling(self, change: int) -> dict[str, Any]:
        """A manual step (the admin endpoints, ``sentientedge scale``): accepted and carried
        out in the background, or refused with a reason (HTTP 409)."""
        try:
            if self._scaling.locked():
                raise ScalingRefused("a scaling is in progress")
            decision = self.autoscaler.request(self.instances, change, time.monotonic())
        except ScalingRefused as exc:
            return {"refused": exc.reason, "instances": self.instances}
        self._start_scaling(decision)
        return {"instances": decision.instances, "target": decision.target, **self._bounds()}

    def _bounds(self) -> dict[str, int]:
        policy = self.config.scaling_policy
        return {"min_instances": policy.min_instances, "max_instances": policy.max_instances}

    def _start_scaling(self, decision: ScalingDecision) -> None:
        self.autoscaler.applied(decision)
        event: dict[str, Any] = {
            **decision.as_dict(),
            "at": time.time(),
            "status": "in progress",
        }
        self.scaling_events.append(event)
        self.scaling_counts[decision.direction.value] += 1
        log.warning(
            "scaling %s: %d -> %d instances (%s)",
            decision.direction.value,
            decision.instances,
            decision.target,
            decision.reason,
        )
        self._scaling_task = asyncio.get_running_loop().create_task(
            self._scale(decision.target, event)
        )

    async def _scale(self, target: int, event: dict[str, Any]) -> None:
        async with self._scaling:
            started = time.monotonic()
            try:
                await self.scale_to(target)
                event["status"] = "done"
            except Exception as exc:
                log.exception("scaling to %d instances failed", target)
                event["status"] = f"failed: {type(exc).__name__}: {exc}"[:200]
            event["took_s"] = round(time.monotonic() - started, 2)

    async def wait_scaled(self, timeout: float = 300.0) -> list[dict[str, Any]]:
        """Until the scaling under way (if any) has finished; the recent scaling events."""
        task = self._scaling_task
        if task is not None:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        return list(self.scaling_events)

    async def scale_to(self, target: int) -> None:
        """Grow or shrink to ``target`` instances: shards by a live reshard, ingresses by
        creating them or draining them (their clients resume on the others)."""
        current = self.instances
        if target > current:
            after = max(map(_index, self.shard_names), default=-1) + 1
            added = [ray_api.shard_name(after + i) for i in range(target - current)]
            await self.reshard([*self.shard_names, *added])
            await self._add_ingresses(target - current)
        elif target < current:
            await self._remove_ingresses(min(current - target, len(self.ingress_names) - 1))
            await self.reshard(self.shard_names[:target])

    async def _each(self, names: list[str], method: str, *args: Any) -> list[Any]:
        handles = {**self.shards, **self.ingresses}
        return list(
            await asyncio.wait_for(
                asyncio.gather(*(ray_api.call(handles[n], method, *args) for n in names)),
                SCALING_STEP_TIMEOUT_S,
            )
        )

    async def reshard(self, shards: list[str]) -> dict[str, Any]:
        """Move the ring to ``shards`` while traffic flows.

        Only the ranges that change hands move. The steps, each on every actor concerned:
        new shards start (loading from Redis what the new ring gives them); every ingress
        connects to them and registers there what it holds (both rings get registrations
        from now on); every shard loads what the new ring gives it; every ingress routes by
        the new ring, holding what it sends until everything sent by the old ring has been
        answered (no QoS 1 message overtakes an earlier one on the same topic); the old
        owners save their retained messages and telemetry and the new owners load them;
        ingresses drop the streams to shards that left, shards forget what they no longer
        own, and the shards that left are stopped.
        """
        old = list(self.shard_names)
        added = [name for name in shards if name not in old]
        removed = [name for name in old if name not in shards]
        namespace = self.config.ray_namespace
        started = time.monotonic()
        for name in added:
            self.shards[name] = ray_api.find_actor(name, namespace) or ray_api.create_shard(
                self.roles.shard, self.config, name, shards
            )
        await self._each(added, "ready")
        ingresses = list(self.ingress_names)
        await self._each(ingresses, "announce_ring", shards)
        self.shard_names = list(shards)
        await self._save_shape()
        await self._each([*old, *added], "adopt_ring", shards)
        await self._each(ingresses, "take_over_ring")
        await self._each([*old, *added], "save_state")
        await self._each(list(shards), "adopt_ring", shards)
        await self._each(ingresses, "finish_ring")
        await self._each(list(shards), "release_unowned")
        for name in removed:
            ray_api.kill(self.shards.pop(name))
        took = round(time.monotonic() - started, 2)
        log.warning("resharded %s -> %s in %.2f s", old, shards, took)
        return {"shards": list(shards), "added": added, "removed": removed, "took_s": took}

    async def _add_ingresses(self, count: int) -> None:
        after = max(map(_index, self.ingress_names), default=-1) + 1
        names = [ray_api.ingress_name(after + i) for i in range(count)]
        nodes = ray_api.alive_node_ids()
        for name in names:
            position = len(self.ingress_names)
            node = nodes[position % len(nodes)] if nodes else None
            self.ingresses[name] = ray_api.find_actor(
                name, self.config.ray_namespace
            ) or ray_api.create_ingress(
                self.roles.ingress, self.config, name, self.shard_names, node
            )
            self.ingress_names.append(name)
        await self._each(names, "start")
        await self._save_shape()

    async def _remove_ingresses(self, count: int) -> None:
        """Drain the newest ``count`` ingresses (their clients resume on the others), then
        stop them."""
        names = self.ingress_names[len(self.ingress_names) - count :] if count > 0 else []
        if not names:
            return
        for name in names:
            self.ingress_names.remove(name)
        await self._save_shape()
        await self._each(names, "drain")
        for name in names:
            ray_api.kill(self.ingresses.pop(name))

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
            "scaling": {
                "instances": self.instances,
                **self._bounds(),
                "autoscale": self.config.autoscale,
                "in_progress": self._scaling.locked(),
                "utilisation": dict(
                    zip(("value", "driven_by"), self.autoscaler.utilisation(), strict=True)
                ),
                "events_total": dict(self.scaling_counts),
                "events": list(self.scaling_events),
            },
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
