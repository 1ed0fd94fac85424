"""Every Ray API call of the router goes through this module.

Keeping ``ray.*`` and ``.remote()`` here (as Ray Serve's deployment_state does) leaves the actor
classes as plain classes that the rest of the code can read and test without Ray.

Actor classes are passed in (:class:`ActorRoles`), never imported here.

Names: the controller is ``controller``, ingresses ``ingress-{i}``, shards ``shard-{i}``, all
detached, in the Ray namespace of the config (``RAY_NAMESPACE``, default ``sentientedge``), so the
Ray dashboard lists each actor by what it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.autoscaler.sdk import request_resources
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sentientedge.config import Config

CONTROLLER = "controller"


@dataclass(frozen=True)
class ActorRoles:
    """The actor classes the controller creates, handed down from the CLI (the composition
    root): this module and the controller import no actor class, so none imports another."""

    ingress: type
    shard: type


# Ray declares a node dead after health checks fail: by default every 3 s, 10 s timeout, 5 in a
# row, so 15-50 s. The router's actors move only once their node is declared dead, so it is
# tuned to about 2 s: probe every 0.5 s, 0.5 s timeout, 3 in a row. The trade: a node that
# stalls for 2 s (a long GC pause, a saturated network) is declared dead and its actors move
# when it would have come back (README, "Failover").
FAST_NODE_FAILURE_DETECTION = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}

# Ray starts worker processes at nice 15, so that batch tasks yield to the raylet. The router's
# actors are servers: at nice 15 on a busy node they wait for a CPU as long as they run, and
# every message's latency grows by that wait. A cluster started for the router runs them at 0.
ROUTER_SYSTEM_CONFIG = {**FAST_NODE_FAILURE_DETECTION, "worker_niceness": 0}


def ingress_name(index: int) -> str:
    return f"ingress-{index}"


def shard_name(index: int) -> str:
    return f"shard-{index}"


def _options(name: str, namespace: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "lifetime": "detached",
        # The controller asks for no CPU (it idles); ingresses and shards for ACTOR_CPUS each
        # (``extra``), so Ray places them where there is room and its autoscaler sees demand.
        "num_cpus": 0,
        "max_concurrency": 10_000,
        # A dead process is started again, as often as it takes; its constructor recovers.
        "max_restarts": -1,
        # Calls are not retried by Ray (a call to a restarting actor fails at once): the
        # channels retry what must not be lost, and every item is idempotent.
        "max_task_retries": 0,
        **extra,
    }


# The dashboard's URL as ray.init reported it when this process joined (None: not told).
_dashboard_url: str | None = None


def connect(address: str | None, namespace: str) -> None:
    """Join a running Ray cluster (``address``: ``auto``, ``host:port`` or ``ray://...``)."""
    global _dashboard_url
    if not ray.is_initialized():
        context = ray.init(
            address=address, namespace=namespace, logging_level=logging.WARNING, log_to_driver=False
        )
        _dashboard_url = getattr(context, "dashboard_url", None)


def disconnect() -> None:
    """Leave the cluster (before it is stopped: a driver still attached is told of every Ray
    process that dies, with its traceback)."""
    ray.shutdown()


def get_actor(name: str, namespace: str) -> Any:
    return ray.get_actor(name, namespace=namespace)


def find_actor(name: str, namespace: str) -> Any | None:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def create_controller(
    controller_cls: type, config: Config, ingresses: int, shards: int, roles: ActorRoles
) -> Any:
    cls: Any = ray.remote(controller_cls)
    # On the head node, as Ray Serve keeps its controller: workers come and go with the
    # autoscaler. Soft: if the head is lost, anywhere.
    head = NodeAffinitySchedulingStrategy(node_id=head_node_id(), soft=True)
    return cls.options(
        **_options(CONTROLLER, config.ray_namespace, scheduling_strategy=head)
    ).remote(config, ingresses, shards, roles)


def create_shard(shard_cls: type, config: Config, name: str, shards: list[str]) -> Any:
    cls: Any = ray.remote(shard_cls)
    options = _options(
        name, config.ray_namespace, scheduling_strategy="SPREAD", num_cpus=config.actor_cpus
    )
    return cls.options(**options).remote(name, config, shards)


def create_ingress(
    ingress_cls: type, config: Config, name: str, shards: list[str], node_id: str | None = None
) -> Any:
    """An ingress pinned to ``node_id``: it serves that node's address, so when the node
    leaves it goes too (the controller places another on a node that serves)."""
    strategy: Any = "SPREAD"
    if node_id is not None:
        strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    cls: Any = ray.remote(ingress_cls)
    options = _options(
        name, config.ray_namespace, scheduling_strategy=strategy, num_cpus=config.actor_cpus
    )
    return cls.options(**options).remote(name, config, shards)


def mavlink_bridge_name(drone_id: str) -> str:
    return f"mavlink-{drone_id}"


def create_mavlink_bridge(bridge_cls: type, settings: Any, namespace: str, node_id: str) -> Any:
    """A vehicle's bridge on the node its link reaches (hard: its serial port or radio is
    there), detached and restarted like the router's actors. Ray keeps the constructor's
    arguments, the drone's API key among them, in its GCS (never in a log line)."""
    cls: Any = ray.remote(bridge_cls)
    strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    name = mavlink_bridge_name(settings.drone_id)
    return cls.options(**_options(name, namespace, scheduling_strategy=strategy)).remote(settings)


def alive_node(id_or_address: str) -> tuple[str, str] | None:
    """The alive node with this id (or id prefix of 8+) or address: (id, address)."""
    for node_id, node in node_addresses(ray.nodes()).items():
        named = id_or_address == node["address"] or (
            len(id_or_address) >= 8 and node_id.startswith(id_or_address)
        )
        if node["alive"] and named:
            return node_id, node["address"]
    return None


def create_load_worker(worker_cls: type, index: int) -> Any:
    """A load generator process (sentientedge.loadgen); worker i goes to the i-th alive node
    (round robin). Ray's SPREAD, and even a soft node affinity, are best effort: a zero-CPU
    actor often lands next to another. Load is meant to come from every node, so: hard."""
    nodes = sorted(alive_node_ids())
    cls: Any = ray.remote(worker_cls)
    return cls.options(  # unnamed: owned by the driver, gone with it
        num_cpus=0,
        max_concurrency=100,
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id=nodes[index % len(nodes)], soft=False
        ),
    ).remote()


async def request_capacity(actors: int, cpus_each: float) -> None:
    """Ask Ray's autoscaler for room for ``actors`` router actors (a standing request: the
    next call replaces it, so shrinking gives nodes back). Without an autoscaler, a no-op."""
    bundles = [{"CPU": cpus_each}] * actors if cpus_each > 0 else []
    await asyncio.get_running_loop().run_in_executor(
        None, lambda: request_resources(bundles=bundles)
    )


def all_done(refs: list[Any]) -> bool:
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    return len(ready) == len(refs)


def get(refs: Any, timeout: float | None = None) -> Any:
    return ray.get(refs, timeout=timeout)


def call(handle: Any, method: str, *args: Any) -> Awaitable[Any]:
    """Call ``method`` on an actor; the result is awaitable from an async actor."""
    return getattr(handle, method).remote(*args)


def call_sync(handle: Any, method: str, *args: Any, timeout: float | None = 60.0) -> Any:
    return ray.get(getattr(handle, method).remote(*args), timeout=timeout)


def kill(handle: Any) -> None:
    ray.kill(handle, no_restart=True)


def stream_resolver(namespace: str, name: str) -> Callable[[], Awaitable[dict[str, Any]]]:
    """Where the actor ``name`` listens for streams now (it changes when Ray restarts it)."""

    async def resolve() -> dict[str, Any]:
        handle = await asyncio.get_running_loop().run_in_executor(None, get_actor, name, namespace)
        address: dict[str, Any] = await handle.stream_address.remote()
        return address

    return resolve


def stream_socket_path(namespace: str, name: str, epoch: str) -> str:
    """A Unix socket path for an actor's streams: short (the kernel allows 108 bytes), private
    to the namespace, new for every process (a stale path is never someone else's)."""
    tag = hashlib.sha256(namespace.encode()).hexdigest()[:10]
    directory = os.path.join(tempfile.gettempdir(), f"se-{tag}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for stale in glob.glob(os.path.join(directory, f"{name}.*.sock")):  # earlier processes'
        with contextlib.suppress(OSError):
            os.unlink(stale)
    return os.path.join(directory, f"{name}.{epoch}.sock")


def node_ip() -> str:
    """The address other nodes reach this one at (Ray's own choice for the node)."""
    return str(ray.util.get_node_ip_address())


def caller(namespace: str, name: str, method: str) -> Callable[..., Awaitable[Any]]:
    """An async function calling ``method`` on the actor ``name``, resolved on each call."""

    async def call_method(*args: Any) -> Any:
        handle = await asyncio.get_running_loop().run_in_executor(None, get_actor, name, namespace)
        return await getattr(handle, method).remote(*args)

    return call_method


# A node with this resource (``ray start --resources '{"sentientedge_ingress": 1}'``) serves
# clients; when no node has it, every node does.
INGRESS_RESOURCE = "sentientedge_ingress"


def serving_nodes(nodes: list[dict[str, Any]]) -> list[str]:
    alive = [node for node in nodes if node.get("Alive")]
    marked = [node for node in alive if node.get("Resources", {}).get(INGRESS_RESOURCE)]
    return [node["NodeID"] for node in (marked or alive)]


async def cluster_nodes() -> list[dict[str, Any]]:
    """Every node Ray knows, as ``ray.nodes`` says (read off the event loop: it blocks)."""
    nodes: list[dict[str, Any]] = await asyncio.get_running_loop().run_in_executor(None, ray.nodes)
    return nodes


async def serving_node_ids() -> list[str]:
    """The nodes that get ingresses."""
    return serving_nodes(await cluster_nodes())


def node_addresses(nodes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each node's address and whether it is alive."""
    return {
        node["NodeID"]: {"address": node.get("NodeManagerAddress"), "alive": bool(node["Alive"])}
        for node in nodes
    }


def head_node_id() -> str:
    """The head node (it holds Ray's GCS), else the node this process runs on."""
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return str(node["NodeID"])
    return str(ray.get_runtime_context().get_node_id())


def alive_node_ids() -> list[str]:
    return [node["NodeID"] for node in ray.nodes() if node.get("Alive")]


def exit_process() -> None:
    """End this actor's process at once; Ray starts it again (max_restarts)."""
    os._exit(1)


def restart(handle: Any) -> None:
    """Kill the actor's process; Ray starts it again (``max_restarts``)."""
    ray.kill(handle, no_restart=False)


def dashboard_url() -> str | None:
    """The Ray dashboard of the cluster :func:`connect` joined (what ``ray.init`` returned:
    ``ray.worker.get_dashboard_url`` is deprecated and says so on standard error)."""
    url = _dashboard_url
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def was_restarted() -> bool:
    """Whether this actor's process is a restart by Ray (max_restarts), not its first start."""
    return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def node_of_current_actor() -> str:
    return ray.get_runtime_context().get_node_id()


def node_labels() -> dict[str, str]:
    """The labels of this process's node (``ray start --labels``)."""
    # Typed as lists of values in Ray 2.60; plain strings at run time.
    labels: dict[str, Any] = dict(ray.get_runtime_context().get_node_labels())
    return {k: v if isinstance(v, str) else ",".join(v) for k, v in labels.items()}
