"""Membership on a cluster of three Ray nodes on this machine (run by test_membership.py).

A process of its own, because the test process is already a driver of the session's cluster.
It prints one JSON line: what each step saw. Steps: every node serves connections; a worker
added later gets an ingress and serves; a worker removed takes its ingress with it, its clients
resume elsewhere, and no acknowledged QoS 1 message is lost.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from actors.local_cluster import LocalCluster
from sentientedge import auth
from sentientedge.client import Client
from tests.e2e.support import QosLoad

DEADLINE_S = 60.0


class People:
    """What QosLoad needs of a router: people connecting with tokens."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster

    async def person(self, role: str, sub: str, **kwargs: Any) -> Client:
        token = auth.mint_jwt(self.cluster.jwt_secret, sub, role, 3600)
        return await Client.connect(self.cluster.url, token=token, **kwargs)


def nodes_serving(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    from actors import ray_api

    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            controller = ray_api.get_actor(ray_api.CONTROLLER, cluster.namespace)
            status = ray_api.call_sync(controller, "cluster_status")
            return {node_id: node for node_id, node in status["nodes"].items() if node["alive"]}
        except Exception:  # the controller restarting elsewhere: ask again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


async def wait_for(condition: Any, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > DEADLINE_S:
            raise TimeoutError(f"no {what} within {DEADLINE_S} s")
        await asyncio.sleep(0.2)
    return round(time.monotonic() - started, 2)


async def main() -> dict[str, Any]:
    report: dict[str, Any] = {}
    with LocalCluster(
        workers=2, ingresses=1, shards=2, AUTOSCALE="false", RATE_LIMIT_MAX="60000"
    ) as cluster:
        people = People(cluster)
        nodes = nodes_serving(cluster)
        report["ingresses_per_node"] = sorted(len(n["ingresses"]) for n in nodes.values())
        # Enough clients that the kernel hands some to every ingress on the port.
        crowd = [await people.person("observer", f"crowd-{i}") for i in range(30)]
        report["serving_nodes"] = await asyncio.to_thread(
            lambda: sum(1 for n in nodes_serving(cluster).values() if n["connections"] > 0)
        )

        load = QosLoad(people, f"m{uuid.uuid4().hex[:6]}")  # type: ignore[arg-type]
        await load.start()
        await load.acked_count_reaches(50, timeout=30)

        before = set(nodes_serving(cluster))
        joined_at = time.monotonic()
        cluster.add_node()  # blocks the loop a few seconds: Ray wants the main thread
        new_node = (set(nodes_serving(cluster)) - before).pop()

        def new_node_serves() -> bool:
            node = nodes_serving(cluster).get(new_node, {})
            return bool(node.get("ingresses"))

        await wait_for(new_node_serves, "ingress on the new node")
        report["join_to_ingress_s"] = round(time.monotonic() - joined_at, 2)
        late = [await people.person("observer", f"late-{i}") for i in range(30)]
        report["new_node_connections"] = nodes_serving(cluster)[new_node]["connections"]

        # A worker leaves with everything on it; the station may have been on it.
        victim = cluster.worker_nodes()[0]
        held = nodes_serving(cluster)[victim.node_id]["ingresses"]
        cluster.remove_node(victim)
        report["removed_node_ingresses"] = held
        # Gone with it: no ingress there, one on every node left. (Ray may start a lost
        # node's actor again elsewhere before the controller sees the node is gone; the
        # controller then stops one of the two that share a node.)
        await wait_for(
            lambda: (
                victim.node_id not in nodes_serving(cluster)
                and all(len(n["ingresses"]) == 1 for n in nodes_serving(cluster).values())
            ),
            "one ingress on every node left",
        )
        await load.acked_count_reaches(50, timeout=DEADLINE_S)
        await load.finish()
        load.check()
        report["acked"] = len(load.acked)
        report["lost"] = len(load.acked - {m.data["n"] for m in load.received})
        report["ingresses_per_node_after"] = sorted(
            len(n["ingresses"]) for n in nodes_serving(cluster).values()
        )
        for client in crowd + late:
            await client.close()
    return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())), flush=True)
