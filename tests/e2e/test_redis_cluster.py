"""A router on a Redis Cluster of 3 masters and 3 replicas (Debian's redis-server 7): its keys
spread over the masters by topic and session, every QoS 1 test (sessions, resume, commands,
retained, presence) passes on it, and a master killed under QoS 1 load loses no acknowledged
message."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from sentientedge.records import Recipient, Stored
from sentientedge.store import Store
from tests.e2e import test_qos1_e2e
from tests.e2e.redis_cluster import RedisCluster
from tests.e2e.support import QosLoad, Router, started_router
from tests.e2e.test_store import publication
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


async def test_the_router_keys_spread_over_every_master_by_topic_and_session(
    router: Router, redis_cluster: RedisCluster
):
    result = router.cli("status")
    assert result.returncode == 0, result.stderr
    tag = uuid.uuid4().hex[:6]
    station = await router.person("observer", sub=f"st-{tag}")
    await station.subscribe(f"fleet/{tag}/#")
    operator = await router.person("operator", sub=f"op-{tag}")
    topics = [f"fleet/{tag}/t{n}" for n in range(30)]
    for n, topic in enumerate(topics):
        await operator.publish(topic, {"n": n}, qos=1, id=f"m{n}")
    # Each topic's stream on the master serving the topic's own slot, and each master holds
    # some (30 topics all on two of three masters: odds of 1 in 60,000); the station's session
    # on the master of its id's slot.
    holding = set()
    for topic in topics:
        master = redis_cluster.master_of("{" + topic + "}")
        assert redis_cluster.client(master).exists(f"{router.namespace}:t:{{{topic}}}"), topic
        holding.add(master)
    assert len(holding) == 3
    session = station.session
    master = redis_cluster.master_of("{" + session + "}")
    assert redis_cluster.client(master).exists(f"{router.namespace}:s:{{{session}}}")
    assert all(redis_cluster.replicas_of(port) == 1 for port in holding)
    # What the whole router shares stays in the namespace's slot.
    shared = redis_cluster.master_of("{" + router.namespace + "}")
    assert redis_cluster.client(shared).exists("{" + router.namespace + "}:shape")
    for client in (station, operator):
        await client.close()


async def test_a_master_killed_under_qos1_load_loses_nothing_acknowledged(
    router: Router, redis_cluster: RedisCluster
):
    load = QosLoad(router, f"rc{uuid.uuid4().hex[:6]}")
    await load.start()
    await load.acked_count_reaches(100, timeout=30)
    # The master of the first topic's slot: its messages' streams and dedupe records are
    # there, the station's session maybe elsewhere.
    topic_key = "{" + load.topics[0] + "}"
    master = redis_cluster.master_of(topic_key)
    redis_cluster.kill(master)
    # Its replica takes the slot over; acknowledgements resume once the old master is back as
    # the new one's replica (REDIS_WAIT_REPLICAS=1: no puback without a copy on a replica).
    await eventually(
        lambda: redis_cluster.master_of(topic_key) != master,
        30,
        "the replica promoted",
    )
    await asyncio.to_thread(redis_cluster.restart, master)
    await load.acked_count_reaches(100, timeout=60)
    await load.finish()
    load.check()
    lost = load.acked - {m.data["n"] for m in load.received}
    assert not lost


@pytest.fixture
async def cluster_store(redis_cluster: RedisCluster):
    store = Store(redis_cluster.url, f"cs-{uuid.uuid4().hex[:6]}", cluster=True, wait_replicas=1)
    yield store
    await store.close()


def _mark_pending(
    store: Store, cluster: RedisCluster, msg_id: str, topic: str, offset: str
) -> tuple[Any, str]:
    """As if a message's first attempt had failed after the sessions' step: its dedupe record,
    marked done by ``settle``, says pending again."""
    dedupe = store.keys.dedupe("user:op", msg_id, topic)
    node = cluster.client(cluster.master_of(dedupe))
    assert node.get(dedupe) == offset
    node.set(dedupe, "p:" + offset)
    return node, dedupe


async def test_a_retried_pending_message_is_queued_once_for_a_session_that_had_it(
    cluster_store: Store, redis_cluster: RedisCluster
):
    store = cluster_store
    await store.create_session("s", "user:a", "ingress-0")
    first = publication("fleet/x", 1, Recipient("s"), msg_id="m1")
    [stored] = await store.publish([first])
    assert isinstance(stored, Stored) and stored.seqs == (1,) and stored.replicated
    await store.settle()
    node, dedupe = _mark_pending(store, redis_cluster, "m1", "fleet/x", stored.offset)
    [again] = await store.publish([first])
    assert isinstance(again, Stored) and not again.duplicate and again.seqs == (0,)
    assert [seq for seq, _ in await store.session_messages("s", 1, 10)] == [1]
    # Now marked done: a third attempt is a plain repeat.
    await store.settle()
    assert node.get(dedupe) == stored.offset
    [third] = await store.publish([first])
    assert isinstance(third, Stored) and third.duplicate and third.offset == stored.offset


async def test_a_retried_pending_message_is_queued_again_after_later_ones_never_lost(
    cluster_store: Store, redis_cluster: RedisCluster
):
    store = cluster_store
    await store.create_session("s", "user:a", "ingress-0")
    first = publication("fleet/x", 1, Recipient("s"), msg_id="m1")
    [stored] = await store.publish([first])
    await store.publish([publication("fleet/x", 2, Recipient("s"), msg_id="m2")])
    await store.settle()
    assert isinstance(stored, Stored)
    _mark_pending(store, redis_cluster, "m1", "fleet/x", stored.offset)
    [again] = await store.publish([first])
    assert isinstance(again, Stored) and again.seqs == (3,)  # at least once
    assert [seq for seq, _ in await store.session_messages("s", 1, 10)] == [1, 2, 3]
