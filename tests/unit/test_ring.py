"""The consistent-hash ring: stable, balanced, and adding a shard moves only its share."""

from __future__ import annotations

import collections

from sentientedge.ring import HashRing

KEYS = [f"drone/{i}" for i in range(20_000)]


def test_same_nodes_same_ring_whatever_the_order():
    assert [HashRing(["a", "b", "c"]).owner(k) for k in KEYS[:500]] == [
        HashRing(["c", "a", "b"]).owner(k) for k in KEYS[:500]
    ]


def test_balance_within_twenty_percent():
    ring = HashRing([f"shard-{i}" for i in range(4)])
    counts = collections.Counter(ring.owner(k) for k in KEYS)
    mean = len(KEYS) / 4
    assert all(abs(c - mean) / mean < 0.2 for c in counts.values()), counts


def test_adding_a_shard_moves_only_keys_to_the_new_shard():
    before = HashRing([f"shard-{i}" for i in range(4)])
    after = before.with_node("shard-4")
    moved = [k for k in KEYS if before.owner(k) != after.owner(k)]
    assert all(after.owner(k) == "shard-4" for k in moved)
    # Ideal share is 1/5 of the keys; allow for virtual-node variance.
    assert 0.12 < len(moved) / len(KEYS) < 0.28


def test_removing_a_shard_moves_only_its_keys():
    before = HashRing([f"shard-{i}" for i in range(4)])
    after = before.without_node("shard-2")
    for k in KEYS[:5000]:
        if before.owner(k) != "shard-2":
            assert after.owner(k) == before.owner(k)
