"""Where a router's keys live on a Redis Cluster (store.Keys, redis_cluster; no Redis needed)."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from sentientedge.redis_cluster import key_prefix, slot_owner, slot_table
from sentientedge.store import Keys

SLOTS = [
    [0, 5460, ["127.0.0.1", 7000, "a"], ["127.0.0.1", 7003, "d"]],
    [5461, 10922, [b"127.0.0.1", 7001, b"b"], [b"127.0.0.1", 7004, b"e"]],
    [10923, 16383, ["127.0.0.1", 7002, "c"]],
]


def test_on_a_cluster_each_topic_session_and_drone_has_a_slot_of_its_own():
    keys = Keys("fleet-a", cluster=True)
    command_topic = key_slot(b"{drone/d1/cmd}")
    # A command's stream, dedupe records, retained message and the drone's queue: one slot.
    for key in (
        keys.topic("drone/d1/cmd"),
        keys.dedupe("user:op", "m1", "drone/d1/cmd"),
        keys.retained_topic("drone/d1/cmd"),
        keys.drone_commands("d1"),
    ):
        assert key_slot(key.encode()) == command_topic, key
    # A session's hash, queue and copied-commands set: one slot.
    session = {key_slot(k.encode()) for k in (keys.session("s1"), keys.session_queue("s1"),
                                                keys.session_commands("s1"))}  # fmt: skip
    assert session == {key_slot(b"{s1}")}
    assert key_slot(keys.drone("d1").encode()) == key_slot(b"{d1}")
    # What the whole router shares: the namespace's slot.
    for key in (keys.revocations, keys.shape, keys.admin("root"), keys.login_failures("x")):
        assert key_slot(key.encode()) == key_slot(b"{fleet-a}"), key
    # Spread: many sessions land on many slots.
    assert len({key_slot(keys.session(f"s{n}").encode()) for n in range(100)}) > 90


def test_a_key_names_its_topic_session_or_drone_back():
    for cluster in (False, True):
        keys = Keys("fleet-a", cluster=cluster)
        assert keys.name_in(keys.session("abc"), "s") == "abc"
        assert keys.name_in(keys.drone("d:1"), "drone") == "d:1"
        assert keys.name_in(keys.retained_topic("fleet/x/y"), "r") == "fleet/x/y"


def test_the_counter_bumped_before_wait_is_in_the_slot_of_the_key_written():
    keys = Keys("fleet-a", cluster=True)
    for key in (keys.session("s9"), keys.topic("drone/d1/telemetry"), "{m7}"):
        mark = keys.replication_mark_near(key)
        assert key_slot(mark.encode()) == key_slot(key.encode())


def test_a_single_redis_keeps_the_names_it_always_had():
    keys = Keys("fleet-a")
    assert keys.session("s1") == "fleet-a:s:s1"
    assert keys.topic("drone/d1/cmd") == "fleet-a:t:drone/d1/cmd"
    assert keys.drone_commands("d1") == "fleet-a:dq:d1"
    assert keys.dedupe("drone:d1", "m1", "drone/d1/event") == "fleet-a:dup:8:drone:d1:m1"
    assert keys.retained == "fleet-a:retained"
    assert key_prefix("fleet-a", True) == "{fleet-a}"


def test_the_slot_table_names_a_master_for_every_served_slot():
    owners, replicas, nodes = slot_table(SLOTS)
    assert owners[0] == ("127.0.0.1", 7000) and owners[5461] == ("127.0.0.1", 7001)
    assert owners[16383] == ("127.0.0.1", 7002)
    assert replicas == {("127.0.0.1", 7000): 1, ("127.0.0.1", 7001): 1, ("127.0.0.1", 7002): 0}
    assert len(nodes) == 5
    unserved, _, _ = slot_table(SLOTS[:1])
    assert unserved[9000] is None


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
