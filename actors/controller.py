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
from collections.abc import Callable
from typing import Any

from actors import ray_api
from actors.process import process_stats, serve_metrics
from sentientedge import logs, state
from sentientedge.autoscale import (
    Autoscaler,
    CpuMeter,
    Load,
    ScalingDecision,
    ScalingRefused,
)
from sentientedge.config import Config
from sentientedge.database import Database
from sentientedge.errors import ArchiveUnavailable, StoreUnavailable
from sentientedge.failover import (
    PROBE_INTERVAL_S,
    PROBE_TIMEOUT_S,
    FailoverEvent,
    FailoverTracker,
)
from sentientedge.metrics import (
    CONTROLLER_COUNTERS,
    CONTROLLER_GAUGES,
    CONTROLLER_LABELLED,
    ProcessLabels,
    StatsCollector,
    make_registry,
)
from sentientedge.placement import next_index, plan_ingresses
from sentientedge.store import Store

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 5.0
# Each step of a scaling (create, announce, take over, ...) on every actor, at most this long.
SCALING_STEP_TIMEOUT_S = 60.0
# New actors wait this long for room: Ray's autoscaler may be starting nodes for them.
ROOM_TIMEOUT_S = 300.0
SCALING_EVENTS_KEPT = 50
ARCHIVE_PRUNE_S = 3600.0


class ScalingFailed(Exception):
    """A scaling step that could not be carried out (recorded on its event)."""


def _kill(name: str, handle: Any) -> None:
    """Stop an actor for good; one already gone (with its node, say) is no error."""
    if handle is None:
        return
    try:
        ray_api.kill(handle)
    except Exception as exc:
        log.info("%s: kill: %s", name, exc)


class RouterController:
    def __init__(
        self, config: Config, ingresses: int, shards: int, roles: ray_api.ActorRoles
    ) -> None:
        # Secrets kept in secrets.env are read again: a restart after `secrets rotate` must
        # make new actors with the rotated ones, not with those this actor was created with.
        config = state.with_stored_secrets(config)
        logs.configure(config.log_level, ray_api.node_ip(), ray_api.CONTROLLER)
        self.config = config
        self.roles = roles
        self.shard_names = [ray_api.shard_name(i) for i in range(shards)]
        self.ingress_names = [ray_api.ingress_name(i) for i in range(ingresses)]
        self.ingress_nodes: dict[str, str | None] = {}  # where each ingress is pinned
        self.wanted_ingresses = ingresses  # at least one per serving node (membership)
        self.shards: dict[str, Any] = {}
        self.ingresses: dict[str, Any] = {}
        self.failovers = FailoverTracker()
        assert config.redis_url is not None
        self.store = Store.for_config(config)
        self.autoscaler = Autoscaler(config.scaling_policy, config.scale_window_ms / 1000)
        self.cpu = CpuMeter()
        self.cpu_rates: dict[str, float] = {}  # each actor's CPU at the last sample
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
        self._metrics_serving = asyncio.get_running_loop().create_task(self._serve_metrics())
        if config.database_url is not None:
            self._pruning = asyncio.get_running_loop().create_task(self._prune_archive())

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
        nodes = await ray_api.serving_node_ids()
        for name in self.ingress_names:
            if name not in self.ingresses:
                found = ray_api.find_actor(name, namespace)
                self.ingresses[name] = found or self._create_ingress(name, nodes)
        names = list(self.ingresses)
        answers = await asyncio.gather(
            *(ray_api.call(self.ingresses[n], "start") for n in names), return_exceptions=True
        )
        started = []
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, BaseException):
                if self.ingress_nodes.get(name) in nodes:
                    raise answer  # on a node that serves: try the whole deploy again
                # Pinned to a node that left while this controller was down: gone with it.
                log.warning("%s did not start (%s); its node is gone", name, answer)
                self._drop_ingress(name)
            else:
                started.append(answer)
                self.ingress_nodes[answer["ingress"]] = answer["node"]
        await self._save_shape()
        await self._request_room()
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
                nodes = await ray_api.cluster_nodes()  # once a round, for both uses
                await self._probe_all(nodes)
                if not self._scaling.locked():
                    await self._follow_membership(ray_api.serving_nodes(nodes))
                if loop.time() >= next_sample:  # load is sampled for status either way
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
                    self.ingress_nodes = dict(shape.get("ingress_nodes", {}))
                    self.wanted_ingresses = int(shape.get("wanted_ingresses", 1))
                await self.deploy()
                return
            except Exception as exc:
                log.warning("controller restart: adopting actors failed: %s", exc)
                await asyncio.sleep(1.0)

    async def _probe_all(self, nodes: list[dict[str, Any]]) -> None:
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
        for node in nodes:
            node_id, alive = node["NodeID"], bool(node.get("Alive"))
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

    # Metrics: every process serves its own; the cluster-wide counts are this one's

    async def _serve_metrics(self) -> str:
        node = ray_api.node_ip()
        registry = make_registry(
            StatsCollector(
                ProcessLabels(node, ray_api.CONTROLLER),
                self._metrics,
                CONTROLLER_COUNTERS,
                CONTROLLER_GAUGES,
                CONTROLLER_LABELLED,
            )
        )
        self._metrics_server, address = await serve_metrics(registry, node)
        return address

    def _metrics(self) -> dict[str, Any]:
        stats: dict[str, Any] = dict(process_stats())
        summary = self.failovers.summary()
        # Every kind and direction from the start: a counter that appears only when it first
        # moves makes rate() and increase() miss that first event.
        stats["failover_events_total"] = {
            **dict.fromkeys(("shard", "ingress", "node", "redis"), 0),
            **summary.get("failover_events_total", {}),
        }
        stats["scaling_events"] = {"up": 0, "down": 0, **self.scaling_counts}
        stats["instances"] = self.instances  # one shard each: the shard count too
        stats["ingresses"] = len(self.ingress_names)
        return stats

    async def metrics_address(self) -> str:
        return await asyncio.shield(self._metrics_serving)

    async def metrics_targets(self) -> list[dict[str, Any]]:
        """Every router process's Prometheus endpoint, in the format of Prometheus's HTTP
        service discovery (served on the port as ``GET /metrics/targets``)."""
        actors = [
            *(("shard", name, h) for name, h in self.shards.items()),
            *(("ingress", name, h) for name, h in self.ingresses.items()),
        ]

        async def address(handle: Any) -> Any:
            try:
                return await asyncio.wait_for(
                    ray_api.call(handle, "metrics_address"), STATUS_TIMEOUT_S
                )
            except Exception:  # restarting or gone: it is back in the next discovery
                return None

        found = await asyncio.gather(*(address(h) for _, _, h in actors))
        groups = [
            {"targets": [at], "labels": {"role": role, "router_actor": name}}
            for (role, name, _), at in zip(actors, found, strict=True)
            if at is not None
        ]
        groups.append(
            {
                "targets": [await self.metrics_address()],
                "labels": {"role": "controller", "router_actor": ray_api.CONTROLLER},
            }
        )
        return groups

    # Scaling: an instance is one ingress and one shard (PROTOCOL.md)

    @property
    def instances(self) -> int:
        return len(self.shard_names)

    def _shape(self) -> dict[str, Any]:
        return {
            "shards": list(self.shard_names),
            "ingresses": list(self.ingress_names),
            "ingress_nodes": {n: self.ingress_nodes.get(n) for n in self.ingress_names},
            "wanted_ingresses": self.wanted_ingresses,
        }

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
            rates = {
                name: self.cpu.rate(name, report["pid"], report["cpu_s"], now)
                for name, report in reports.items()
                if "cpu_s" in report
            }
            self.cpu_rates.update({n: r for n, r in rates.items() if r is not None})
            return max((rate for rate in rates.values() if rate is not None), default=0.0)

        self.cpu.forget(set(ingresses) | set(shards))
        for gone in set(self.cpu_rates) - set(ingresses) - set(shards):
            del self.cpu_rates[gone]
        return Load(
            instances=self.instances,
            connections=sum(r.get("connections", 0) for r in ingresses.values()),
            max_connections_per_instance=self.config.max_ws_connections,
            ingress_cpu=busiest(ingresses),
            shard_cpu=busiest(shards),
        )

    async def _prune_archive(self) -> None:
        """Retention of the flight history: day partitions older than ARCHIVE_RETENTION_DAYS
        dropped, at start and hourly (one controller a cluster: one pruner)."""
        assert self.config.database_url is not None
        database = Database(self.config.database_url, 1)
        while True:
            try:
                dropped = await database.prune(self.config.archive_retention_days)
                if dropped:
                    log.info("archive retention dropped %s", ", ".join(dropped))
            except ArchiveUnavailable as exc:
                log.warning("archive retention not applied now: %s", exc)
            await asyncio.sleep(ARCHIVE_PRUNE_S)

    async def _autoscale(self) -> None:
        if self._scaling.locked():
            return
        load = await self._sample()
        now = time.monotonic()
        self.autoscaler.observe(load, now)
        if not self.config.autoscale:
            return
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
            after = next_index(self.shard_names)
            added = [ray_api.shard_name(after + i) for i in range(target - current)]
            await self.reshard([*self.shard_names, *added])
            self.wanted_ingresses += target - current
            await self._place_ingresses()
        elif target < current:
            self.wanted_ingresses = max(1, self.wanted_ingresses - (current - target))
            await self._place_ingresses()
            await self.reshard(self.shard_names[:target])

    async def _each(
        self, names: list[str], method: str, *args: Any, timeout: float = SCALING_STEP_TIMEOUT_S
    ) -> list[Any]:
        handles = {**self.shards, **self.ingresses}
        return list(
            await asyncio.wait_for(
                asyncio.gather(*(ray_api.call(handles[n], method, *args) for n in names)),
                timeout,
            )
        )

    async def _request_room(self) -> None:
        """Room for every actor the controller holds now (Ray's autoscaler adds nodes for more,
        and takes back what fewer leave idle)."""
        try:
            actors = len(self.shards) + len(self.ingresses)
            await ray_api.request_capacity(actors, self.config.actor_cpus)
        except Exception as exc:  # a hint to the autoscaler; scaling goes on without it
            log.warning("asking Ray's autoscaler for room failed: %s", exc)

    async def _started_or_dropped(
        self, names: list[str], method: str, drop: Callable[[str], None]
    ) -> None:
        """Wait until the new actors ``names`` answer ``method``; if there is no room for them
        in time, drop them again and say so."""
        await self._request_room()
        try:
            await self._each(names, method, timeout=ROOM_TIMEOUT_S)
        except Exception as exc:
            for name in names:
                drop(name)
            await self._request_room()
            raise ScalingFailed(
                f"{', '.join(names)} did not start within {ROOM_TIMEOUT_S:.0f} s "
                f"({type(exc).__name__}): no room on the cluster? Each asks for "
                f"ACTOR_CPUS={self.config.actor_cpus} CPU"
            ) from exc

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
        await self._started_or_dropped(added, "ready", self._drop_shard)
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
            self._drop_shard(name)
        await self._request_room()
        took = round(time.monotonic() - started, 2)
        log.warning("resharded %s -> %s in %.2f s", old, shards, took)
        return {"shards": list(shards), "added": added, "removed": removed, "took_s": took}

    # Membership: an ingress on every serving node (sentientedge/placement.py)

    async def _follow_membership(self, nodes: list[str]) -> None:
        """Nodes joined or left since the last round: place or drop their ingresses."""
        if plan_ingresses(self.wanted_ingresses, nodes, self._placed()):
            async with self._scaling:
                await self._place_ingresses(nodes)

    def _placed(self) -> dict[str, str | None]:
        return {name: self.ingress_nodes.get(name) for name in self.ingress_names}

    def _create_ingress(self, name: str, nodes: list[str]) -> Any:
        """Create ``name`` on the node the shape put it on, or on the serving node with the
        fewest ingresses."""
        node = self.ingress_nodes.get(name)
        if node not in nodes:
            load = {n: 0 for n in nodes}
            for other, at in self.ingress_nodes.items():
                if at in load and other in self.ingresses:
                    load[at] += 1
            node = min(load, key=lambda n: (load[n], n)) if load else None
        self.ingress_nodes[name] = node
        return ray_api.create_ingress(self.roles.ingress, self.config, name, self.shard_names, node)

    async def _place_ingresses(self, nodes: list[str] | None = None) -> None:
        """Make the ingresses match the plan: drop those whose node left, drain the surplus
        (their clients resume on the others), create the missing ones pinned to their nodes."""
        if nodes is None:
            nodes = await ray_api.serving_node_ids()
        plan = plan_ingresses(self.wanted_ingresses, nodes, self._placed())
        for name in plan.gone:
            log.warning("membership: %s's node left; it is gone with it", name)
            self._drop_ingress(name)
        if plan.surplus:
            for name in plan.surplus:
                self.ingress_names.remove(name)
            await self._save_shape()
            await self._each(plan.surplus, "drain")
            for name in plan.surplus:
                self._drop_ingress(name)
        if plan.create_on:
            after = next_index(self.ingress_names)
            names = [ray_api.ingress_name(after + i) for i in range(len(plan.create_on))]
            for name, node in zip(names, plan.create_on, strict=True):
                self.ingress_nodes[name] = node
                self.ingresses[name] = self._create_ingress(name, nodes)
                self.ingress_names.append(name)
                log.warning("membership: %s placed on node %s", name, (node or "?")[:12])
            try:
                await self._started_or_dropped(names, "start", self._drop_ingress)
            finally:
                await self._save_shape()
        elif plan.gone or plan.surplus:
            await self._request_room()
        await self._save_shape()

    def _drop_shard(self, name: str) -> None:
        self.failovers.forget(name)
        _kill(name, self.shards.pop(name, None))

    def _drop_ingress(self, name: str) -> None:
        if name in self.ingress_names:
            self.ingress_names.remove(name)
        self.ingress_nodes.pop(name, None)
        self.failovers.forget(name)
        _kill(name, self.ingresses.pop(name, None))

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
        nodes = ray_api.node_addresses(await ray_api.cluster_nodes())
        for entry in nodes.values():
            entry.update(ingresses=[], shards=[], connections=0, cpu=0.0)
        for group, reports in (("ingresses", ingresses), ("shards", status["shards"])):
            for name, report in reports.items():
                held_by = nodes.get(report.get("node") or self.ingress_nodes.get(name) or "")
                if held_by is not None:
                    held_by[group].append(name)
                    if group == "ingresses" and "port" in report:
                        held_by["port"] = report["port"]  # sentientedge/port or PORT
                    held_by["connections"] += report.get("connections", 0)
                    # CPU seconds per second of its router processes, at the last sample.
                    held_by["cpu"] = round(held_by["cpu"] + self.cpu_rates.get(name, 0.0), 3)
        return {
            **status,
            "nodes": nodes,
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

    async def renew_ingresses(self) -> list[dict[str, Any]]:
        """Replace every ingress with one made from the secrets in force now (after
        ``secrets rotate`` or ``retire``), one at a time: the new one listens on the port
        before the old one drains, so clients always find an ingress and resume there."""
        async with self._scaling:  # no scaling or membership change meanwhile
            self.config = state.with_stored_secrets(self.config)
            reports = []
            for old in list(self.ingress_names):
                name = ray_api.ingress_name(next_index(self.ingress_names))
                node = self.ingress_nodes.get(old)
                self.ingress_nodes[name] = node
                self.ingresses[name] = ray_api.create_ingress(
                    self.roles.ingress, self.config, name, self.shard_names, node
                )
                self.ingress_names.append(name)
                await self._started_or_dropped([name], "start", self._drop_ingress)
                await self._save_shape()
                report = await ray_api.call(self.ingresses[old], "drain")
                self._drop_ingress(old)
                await self._save_shape()
                reports.append({**report, "replaced_by": name})
            return reports

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
        for name, handle in [*self.ingresses.items(), *self.shards.items()]:
            _kill(name, handle)
        self.ingresses.clear()
        self.shards.clear()
