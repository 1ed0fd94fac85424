"""Scaling while traffic flows: the admin endpoints, and shards 2 -> 4 -> 2 under QoS 1 load.

The live reshard runs on a router of its own (2 ingresses, 2 shards at first); the admin
endpoints' refusals are checked on the session's router, which they leave as it was.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from sentientedge.client import Client, Message
from sentientedge.ring import HashRing
from tests.e2e.support import (
    QosLoad,
    RedisServer,
    Router,
    http_request,
    metric_samples,
    started_router,
    status,
)
from tests.helpers import eventually

SCALING_BOUND_S = 120.0


async def post(router: Router, path: str, token: str | None, body: bytes | None = None) -> Any:
    return await asyncio.to_thread(
        http_request, f"{router.http}{path}", "POST", token, body if body is not None else b""
    )


@pytest.fixture(scope="module")
def scaling_router(
    ray_cluster: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Router]:
    with started_router(
        ray_cluster,
        redis_server,
        tmp_path_factory.mktemp("scaling-state"),
        ingresses=2,
        shards=2,
        RATE_LIMIT_MAX="60000",
        MIN_INSTANCES="2",
        MAX_INSTANCES="4",
    ) as router:
        yield router


async def test_scale_endpoints_refuse_what_they_must(router: Router):
    admin = router.admin_token()
    shards_before = len(status(router)["shards"])
    status_code, _, body = await post(router, "/admin/scale-up", None)
    assert status_code == 401 and json.loads(body)["error"] == "unauthorized"
    status_code, _, body = await post(router, "/admin/scale-up", router.token("operator", "op"))
    assert status_code == 403 and json.loads(body)["error"] == "forbidden"
    # An admin token without a second factor (ADMIN_MFA=required, the default).
    status_code, _, body = await post(router, "/admin/scale-up", router.token("admin", "root"))
    assert status_code == 403 and json.loads(body)["error"] == "mfa_required"
    for bad in (b"{not json", b'{"instances": 0}', b'{"instances": "2"}', b"[1]", b'{"n": 1}'):
        status_code, _, body = await post(router, "/admin/scale-up", admin, bad)
        assert status_code == 400, bad
        assert json.loads(body)["error"] == "bad_request"
    # Beyond MAX_INSTANCES (20) and below MIN_INSTANCES (2): 409, with a body or without.
    status_code, _, body = await post(router, "/admin/scale-up", admin, b'{"instances": 50}')
    assert status_code == 409 and "MAX_INSTANCES" in json.loads(body)["reason"]
    status_code, _, body = await post(router, "/admin/scale-down", admin, b'{"instances": 3}')
    assert status_code == 409 and "outside" in json.loads(body)["reason"]
    status_code, headers, _ = await asyncio.to_thread(
        http_request, f"{router.http}/admin/scale-up", "GET", admin
    )
    assert status_code == 405 and headers["Allow"] == "POST"
    assert len(status(router)["shards"]) == shards_before


class ExactStation:
    """A subscriber to some of the load's topics by their exact names (the routes that move
    with their topics in a reshard), with a persistent session that resumes."""

    def __init__(self, client: Client, topics: list[str]) -> None:
        self.client = client
        self.topics = topics
        self.received: list[Message] = []
        self.task = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        while True:
            message = await self.client.recv()
            if message.topic in self.topics and not message.retained:
                self.received.append(message)

    def values(self) -> dict[str, list[int]]:
        per_topic: dict[str, list[int]] = collections.defaultdict(list)
        for message in self.received:
            per_topic[message.topic].append(message.data["n"])
        return per_topic


async def scale(router: Router, direction: str, instances: int) -> dict[str, Any]:
    admin = router.admin_token()
    body = json.dumps({"instances": instances}).encode()
    status_code, _, answer = await post(router, f"/admin/scale-{direction}", admin, body)
    assert status_code == 202, answer
    accepted = json.loads(answer)

    async def finished() -> bool:
        try:
            code, _, raw = await asyncio.to_thread(
                http_request, f"{router.http}/admin/cluster-status", "GET", admin
            )
        except OSError:  # the ingress that took the connection was draining
            return False
        if code != 200:
            return False
        scaling = json.loads(raw)["scaling"]
        return not scaling["in_progress"] and scaling["events"][-1]["status"] != "in progress"

    await eventually(finished, SCALING_BOUND_S, f"scale-{direction} to finish", interval=0.5)
    return accepted


async def test_shards_2_to_4_to_2_under_qos1_load_lose_nothing(scaling_router: Router):
    router = scaling_router
    grown = HashRing(["shard-0", "shard-1", "shard-2", "shard-3"])
    while True:  # topics of which the grown ring gives some to the new shards
        tag = f"rs{uuid.uuid4().hex[:6]}"
        moving = [
            f"fleet/{tag}/t{i}"
            for i in range(8)
            if grown.owner(f"fleet/{tag}/t{i}") in ("shard-2", "shard-3")
        ]
        if len(moving) >= 2:
            break
    load = QosLoad(router, tag, topics=8)
    stations = []
    for i in range(4):
        client = await router.person("observer", sub=f"ex-{tag}-{i}", reconnect=True)
        topics = load.topics[2 * i : 2 * i + 2]
        await client.subscribe(*topics)
        stations.append(ExactStation(client, topics))
    await load.start()
    retained = [f"fleet/{tag}-kept/{i}" for i in range(8)]
    for i, topic in enumerate(retained):
        await load.operator.publish(topic, {"r": i}, qos=1, retain=True)
    drone_id = f"{tag}-d"
    drone = await router.drone(drone_id, reconnect=True)
    await load.acked_count_reaches(60, timeout=30)

    accepted = await scale(router, "up", 2)
    assert (accepted["instances"], accepted["target"]) == (2, 4)
    shape = status(router)
    assert sorted(shape["shards"]) == ["shard-0", "shard-1", "shard-2", "shard-3"]
    assert len(shape["ingresses"]) == 4
    await load.acked_count_reaches(60, timeout=30)
    # The new shards took over their part of the topics: they store its messages now.
    shards = status(router)["shards"]
    assert shards["shard-2"]["stored"] + shards["shard-3"]["stored"] > 0

    accepted = await scale(router, "down", 2)
    assert (accepted["instances"], accepted["target"]) == (4, 2)
    assert sorted(status(router)["shards"]) == ["shard-0", "shard-1"]
    await load.acked_count_reaches(60, timeout=60)

    await load.finish()
    load.check()  # every acked message delivered, in order per topic, none twice
    for station in stations:
        expected = {
            t: sorted(n for n in load.acked if n % 8 == load.topics.index(t))
            for t in station.topics
        }

        def complete(station: ExactStation = station, expected: dict = expected) -> bool:
            got = station.values()
            return all(set(expected[t]) <= set(got.get(t, [])) for t in station.topics)

        await eventually(complete, 60, "every acked message at the exact subscribers")
        for topic, values in station.values().items():
            assert values == sorted(values), f"{topic} out of order at an exact subscriber"
        station.task.cancel()
        await station.client.close()

    # Retained messages and presence survived two moves of the ring.
    newcomer = await router.person("observer")
    await newcomer.subscribe(f"fleet/{tag}-kept/+", f"drone/{drone_id}/status")
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + 20
    while len(seen) < 9 and time.monotonic() < deadline:
        message = await newcomer.recv(timeout=max(0.1, deadline - time.monotonic()))
        seen[message.topic] = message.data
    assert {t: seen.get(t) for t in retained} == {t: {"r": i} for i, t in enumerate(retained)}
    assert seen.get(f"drone/{drone_id}/status") == {"online": True}
    drones = [d for d in status(router)["drones"] if d["drone"] == drone_id]
    assert len(drones) == 1 and drones[0]["online"]
    await newcomer.close()
    await drone.close()


async def test_the_autoscaler_steps_up_under_load_and_back_down_when_it_goes(
    ray_cluster: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
):
    # Utilisation by connections: 9 of 10 allowed on one instance is 0.9, over 0.8.
    with started_router(
        ray_cluster,
        redis_server,
        tmp_path_factory.mktemp("autoscale-state"),
        ingresses=1,
        shards=1,
        AUTOSCALE="true",
        MIN_INSTANCES="1",
        MAX_INSTANCES="2",
        MAX_WS_CONNECTIONS="10",
        SCALE_WINDOW="2000",
        SCALE_UP_COOLDOWN="1000",
        SCALE_DOWN_COOLDOWN="4000",
    ) as router:
        admin = router.admin_token()

        async def scaling() -> dict[str, Any]:
            code, _, raw = await asyncio.to_thread(
                http_request, f"{router.http}/admin/cluster-status", "GET", admin
            )
            return json.loads(raw)["scaling"] if code == 200 else {}

        async def settled_at(instances: int) -> bool:
            state = await scaling()
            events = state.get("events", [])
            return (
                state.get("instances") == instances
                and not state["in_progress"]
                and all(e["status"] == "done" for e in events)
            )

        clients = [await router.person("observer") for _ in range(9)]
        await eventually(lambda: settled_at(2), 60, "one step up", interval=0.5)
        # 9 connections on 2 instances is 0.45: between the thresholds, no further step (and
        # MAX_INSTANCES is 2 anyway).
        state = await scaling()
        assert [(e["direction"], e["instances"], e["target"]) for e in state["events"]] == [
            ("up", 1, 2)
        ]
        assert "connections" in state["events"][0]["reason"]
        assert not state["events"][0]["manual"]
        for client in clients:
            await client.close()
        await eventually(lambda: settled_at(1), 60, "one step down", interval=0.5)
        state = await scaling()
        assert [(e["direction"], e["target"]) for e in state["events"]] == [
            ("up", 2),
            ("down", 1),
        ]
        assert state["events_total"] == {"up": 1, "down": 1}
        metrics = (await asyncio.to_thread(http_request, f"{router.http}/metrics"))[2].decode()
        counted = {
            labels["direction"]: value
            for labels, value in metric_samples(metrics, "scaling_events_total")
        }
        assert counted == {"up": 1.0, "down": 1.0}
