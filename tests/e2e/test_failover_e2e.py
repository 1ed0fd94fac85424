"""Router processes die under load; clients carry on and nothing acknowledged is lost.

A router of its own (2 ingresses, 2 shards on the session's Redis), so killing its processes
disturbs no other test. Processes are killed with SIGKILL: no goodbye, as in a crash.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.e2e.support import (
    QosLoad,
    RedisServer,
    Router,
    http_get,
    metric_samples,
    started_router,
    status,
)
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


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


async def test_shard_killed_under_qos1_load_loses_nothing_acked(failover_router: Router):
    load = QosLoad(failover_router, f"k{uuid.uuid4().hex[:6]}")
    await load.start()
    await load.acked_count_reaches(100, timeout=30)
    victim = status(failover_router)["shards"]["shard-0"]
    kill(victim["pid"])
    recovered_in = await load.acked_count_reaches(100, timeout=FAILOVER_BOUND_S)
    await load.finish()
    load.check()
    after = status(failover_router)["shards"]["shard-0"]
    assert after["pid"] != victim["pid"] and after["ready"]

    # The controller counted it, and exports the count (once: no other process does).
    def failovers() -> list[tuple[dict[str, str], float]]:
        text = http_get(f"{failover_router.http}/metrics")[2].decode()
        return metric_samples(text, "failover_events_total")

    await eventually(
        lambda: any(labels["kind"] == "shard" for labels, _ in failovers()),
        20,
        "the shard failover in /metrics",
    )
    assert {labels["actor"] for labels, _ in failovers()} == {"controller"}
    # The subscription survived the shard's death: the station never subscribed again.
    assert load.station.reconnects == 0
    assert recovered_in < FAILOVER_BOUND_S


async def test_ingress_killed_its_clients_resume_and_lose_nothing_acked(failover_router: Router):
    load = QosLoad(failover_router, f"i{uuid.uuid4().hex[:6]}")
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
    load = QosLoad(failover_router, f"d{uuid.uuid4().hex[:6]}")
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
