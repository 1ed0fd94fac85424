"""Router processes die under load; clients carry on and nothing acknowledged is lost.

A router of its own (2 ingresses, 2 shards on the session's Redis), so killing its processes
disturbs no other test. Processes are killed with SIGKILL: no goodbye, as in a crash.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from sentientedge.client import Message
from sentientedge.errors import ServerError
from tests.e2e.support import RedisServer, Router, http_get, started_router
from tests.helpers import eventually

FAILOVER_BOUND_S = 30.0  # the design's promise; the router aims at a few seconds


@pytest.fixture(scope="module")
def failover_router(
    ray_cluster: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Router]:
    with started_router(
        ray_cluster,
        redis_server,
        tmp_path_factory.mktemp("failover-state"),
        ingresses=2,
        shards=2,
        RATE_LIMIT_MAX="60000",
        PING_INTERVAL="1",
        PING_TIMEOUT="3",
    ) as router:
        yield router


def status(router: Router) -> dict[str, Any]:
    result = router.cli("status", "--address", router.ray_address, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


class Load:
    """An operator publishing QoS 1 messages on several topics, retrying what is not acked
    (same id), and a station receiving them; both reconnect by themselves."""

    def __init__(self, router: Router, tag: str, topics: int = 6) -> None:
        self.router = router
        self.tag = tag
        self.prefix = f"fleet/{tag}"
        self.topics = [f"{self.prefix}/t{i}" for i in range(topics)]
        self.acked: set[int] = set()
        self.received: list[Message] = []
        self.unavailable = 0
        self.stop = asyncio.Event()

    async def start(self) -> None:
        self.station = await self.router.person("observer", sub=f"st-{self.tag}", reconnect=True)
        await self.station.subscribe(f"{self.prefix}/#")
        self.operator = await self.router.person("operator", sub=f"op-{self.tag}", reconnect=True)
        self.tasks = [
            asyncio.create_task(self._publish()),
            asyncio.create_task(self._receive()),
        ]

    async def _publish(self) -> None:
        n = 0
        while not self.stop.is_set():
            while True:
                try:
                    await self.operator.publish(
                        self.topics[n % len(self.topics)], {"n": n}, qos=1, id=f"m{n}", timeout=60
                    )
                    break
                except ServerError as exc:  # nothing stored: send the same id again
                    assert exc.code == "unavailable", exc
                    self.unavailable += 1
                    await asyncio.sleep(0.05)
            self.acked.add(n)
            n += 1
            await asyncio.sleep(0.005)

    async def _receive(self) -> None:
        while True:
            message = await self.station.recv()
            if message.topic.startswith(self.prefix) and not message.retained:
                self.received.append(message)

    async def acked_count_reaches(self, count: int, timeout: float) -> float:
        start = time.monotonic()
        target = len(self.acked) + count
        while len(self.acked) < target:
            assert time.monotonic() - start < timeout, "publishing did not resume in time"
            await asyncio.sleep(0.05)
        return time.monotonic() - start

    async def finish(self) -> None:
        self.stop.set()
        await self.tasks[0]
        deadline = time.monotonic() + 60
        while missing := self.acked - {m.data["n"] for m in self.received}:
            assert time.monotonic() < deadline, f"acked, never delivered: {sorted(missing)[:20]}"
            await asyncio.sleep(0.1)
        self.tasks[1].cancel()
        for client in (self.station, self.operator):
            await client.close()

    def check(self) -> None:
        per_topic: dict[str, list[int]] = collections.defaultdict(list)
        for message in self.received:
            per_topic[message.topic].append(message.data["n"])
        for topic, values in per_topic.items():
            assert values == sorted(values), f"{topic} out of order"
            assert len(values) == len(set(values)), f"{topic} delivered twice to the application"


async def test_shard_killed_under_qos1_load_loses_nothing_acked(failover_router: Router):
    load = Load(failover_router, f"k{uuid.uuid4().hex[:6]}")
    await load.start()
    await load.acked_count_reaches(100, timeout=30)
    victim = status(failover_router)["shards"]["shard-0"]
    kill(victim["pid"])
    recovered_in = await load.acked_count_reaches(100, timeout=FAILOVER_BOUND_S)
    await load.finish()
    load.check()
    after = status(failover_router)["shards"]["shard-0"]
    assert after["pid"] != victim["pid"] and after["ready"]
    # The controller counted it, and the ingresses export the count.
    await eventually(
        lambda: (
            'sentientedge_failover_events_total{kind="shard"}'
            in http_get(f"{failover_router.http}/metrics")[2].decode()
        ),
        20,
        "the shard failover in /metrics",
    )
    # The subscription survived the shard's death: the station never subscribed again.
    assert load.station.reconnects == 0
    assert recovered_in < FAILOVER_BOUND_S


async def test_ingress_killed_its_clients_resume_and_lose_nothing_acked(failover_router: Router):
    load = Load(failover_router, f"i{uuid.uuid4().hex[:6]}")
    await load.start()
    await load.acked_count_reaches(100, timeout=30)
    held_by = load.station.welcome.server
    before = status(failover_router)["ingresses"][held_by]
    kill(before["pid"])
    await load.acked_count_reaches(100, timeout=FAILOVER_BOUND_S)
    await load.finish()
    load.check()
    assert load.station.reconnects >= 1
    assert load.station.welcome.resumed


async def test_a_drained_ingress_moves_every_client_and_loses_nothing(failover_router: Router):
    load = Load(failover_router, f"d{uuid.uuid4().hex[:6]}")
    await load.start()
    await load.acked_count_reaches(50, timeout=30)
    drained = load.station.welcome.server
    result = failover_router.cli(
        "drain", drained, "--restart", "--address", failover_router.ray_address
    )
    assert result.returncode == 0, result.stderr
    assert "closed with 1012" in result.stdout
    await load.acked_count_reaches(50, timeout=FAILOVER_BOUND_S)
    await load.finish()
    load.check()
    assert load.station.reconnects >= 1
    # The restarted ingress serves again.
    assert "error" not in status(failover_router)["ingresses"][drained]


async def test_a_drone_whose_ingress_dies_is_reported_offline(failover_router: Router):
    drone_id = f"lw-{uuid.uuid4().hex[:6]}"
    station = await failover_router.person("observer", reconnect=True)  # may share the ingress
    await station.subscribe(f"drone/{drone_id}/status")
    drone = await failover_router.drone(drone_id)
    online = await station.recv(timeout=10)
    assert online.data == {"online": True}
    kill(status(failover_router)["ingresses"][drone.welcome.server]["pid"])
    deadline = time.monotonic() + FAILOVER_BOUND_S
    while True:
        message = await station.recv(timeout=max(0.1, deadline - time.monotonic()))
        if message.topic == f"drone/{drone_id}/status" and message.data.get("online") is False:
            break
    assert message.data["reason"] in ("router process lost", "connection lost", "ping timeout")
    await station.close()
