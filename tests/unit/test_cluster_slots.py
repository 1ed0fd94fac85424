"""Where a router's keys live on a Redis Cluster (sentientedge/store.py, no Redis needed)."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from sentientedge.redis_cluster import key_prefix, slot_owner
from sentientedge.store import Keys

SLOTS = [
    [0, 5460, ["127.0.0.1", 7000, "a"], ["127.0.0.1", 7003, "d"]],
    [5461, 10922, [b"127.0.0.1", 7001, b"b"], [b"127.0.0.1", 7004, b"e"]],
    [10923, 16383, ["127.0.0.1", 7002, "c"]],
]


def test_every_key_of_a_router_on_a_cluster_is_in_the_slot_of_its_namespace():
    keys = Keys("fleet-a", cluster=True)
    slot = key_slot(b"{fleet-a}")
    for key in (
        keys.topic("drone/d1/cmd"),
        keys.session("s1"),
        keys.drone_commands("d1"),
        keys.dedupe("drone:d1", "m1"),
        keys.retained,
        keys.revocations,
        keys.shape,
    ):
        assert key_slot(key.encode()) == slot, key
    # A single Redis keeps the names it always had.
    assert Keys("fleet-a").session("s1") == "fleet-a:s:s1"
    assert key_prefix("fleet-a", True) == "{fleet-a}"


@pytest.mark.parametrize(
    ("slot", "master", "replicas"),
    [(0, ("127.0.0.1", 7000), 1), (5461, ("127.0.0.1", 7001), 1), (16383, ("127.0.0.1", 7002), 0)],
)
def test_the_master_of_a_slot_and_its_replicas_come_from_cluster_slots(slot, master, replicas):
    found, count, nodes = slot_owner(SLOTS, slot)
    assert found == master and count == replicas
    assert ("127.0.0.1", 7004) in nodes and len(nodes) == 5


def test_a_slot_no_node_serves_is_an_error():
    with pytest.raises(LookupError):
        slot_owner(SLOTS[:1], 9000)
