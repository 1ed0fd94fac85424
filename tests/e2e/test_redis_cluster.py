"""A router on a Redis Cluster of 3 masters and 3 replicas (Debian's redis-server 7): every
QoS 1 test (sessions, resume, commands, retained, presence) passes on it, and a master killed
under QoS 1 load loses no acknowledged message."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e import test_qos1_e2e
from tests.e2e.redis_cluster import RedisCluster
from tests.e2e.support import QosLoad, Router, started_router
from tests.helpers import eventually


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster(masters=3, replicas=1).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def router(
    ray_cluster: str,
    redis_server: Any,
    redis_cluster: RedisCluster,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Router]:
    """This module's router: as the session's (the QoS 1 tests' settings), on the cluster."""
    with started_router(
        ray_cluster,
        redis_server,
        tmp_path_factory.mktemp("cluster-state"),
        ingresses=2,
        shards=4,
        REDIS_URL=redis_cluster.url,
        PING_INTERVAL="1",
        PING_TIMEOUT="3",
        RATE_LIMIT_MAX="6000",
    ) as started:
        yield started


# Every test of the QoS 1 module, run again here with this module's router.
for _name, _test in vars(test_qos1_e2e).items():
    if _name.startswith("test_"):
        globals()[_name] = _test


def test_up_recognises_the_cluster_and_waits_for_a_replica(
    router: Router, redis_cluster: RedisCluster
):
    result = router.cli("status")
    assert result.returncode == 0, result.stderr
    # Every key of the router in the one slot of its namespace, on one master and its replica.
    master = redis_cluster.master_of("{" + router.namespace + "}")
    keys = list(redis_cluster.client(master).scan_iter("{" + router.namespace + "}:*"))
    assert keys
    assert redis_cluster.replicas_of(master) == 1


async def test_a_master_killed_under_qos1_load_loses_nothing_acknowledged(
    router: Router, redis_cluster: RedisCluster
):
    load = QosLoad(router, f"rc{uuid.uuid4().hex[:6]}")
    await load.start()
    await load.acked_count_reaches(100, timeout=30)
    master = redis_cluster.master_of("{" + router.namespace + "}")
    redis_cluster.kill(master)
    # Its replica takes the slot over; acknowledgements resume once the old master is back as
    # the new one's replica (REDIS_WAIT_REPLICAS=1: no puback without a copy on a replica).
    await eventually(
        lambda: redis_cluster.master_of("{" + router.namespace + "}") != master,
        30,
        "the replica promoted",
    )
    await asyncio.to_thread(redis_cluster.restart, master)
    await load.acked_count_reaches(100, timeout=60)
    await load.finish()
    load.check()
    lost = load.acked - {m.data["n"] for m in load.received}
    assert not lost
