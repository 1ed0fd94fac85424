"""The durable model's scripts against a real redis-server (no router around them)."""

from __future__ import annotations

import uuid

import pytest

from sentientedge import codec, protocol
from sentientedge.records import Publication, Recipient, Retention
from sentientedge.store import Store
from tests.e2e.support import RedisServer


@pytest.fixture
async def store(redis_server: RedisServer):
    store = Store(redis_server.url, f"st-{uuid.uuid4().hex[:6]}", Retention(session_ttl_s=60))
    yield store
    await store.close()


def frame(topic: str, data: object) -> bytes:
    return codec.encode_msgpack(protocol.msg_frame(topic, data, 1, "op", 1))


def publication(topic: str, data: object, *recipients: Recipient, msg_id: str | None = None):
    return Publication(
        principal="user:op",
        msg_id=msg_id or uuid.uuid4().hex,
        topic=topic,
        frame=frame(topic, data),
        recipients=recipients,
        command_for=topic.split("/")[1] if topic.endswith("/cmd") else None,
    )


async def test_publish_assigns_seqs_per_session_and_recognises_a_repeated_id(store: Store):
    await store.create_session("a", "user:a", "ingress-0")
    await store.create_session("b", "user:b", "ingress-0")
    first = publication("fleet/x", 1, Recipient("a"), Recipient("b"), msg_id="m1")
    second = publication("fleet/x", 2, Recipient("a"), Recipient("gone"))
    [one, two] = await store.publish([first, second])
    assert one.seqs == (1, 1) and two.seqs == (2, -1)  # type: ignore[union-attr]
    [again] = await store.publish([first])
    assert again.duplicate and again.offset == one.offset  # type: ignore[union-attr]
    assert [seq for seq, _ in await store.session_messages("a", 1, 10)] == [1, 2]


async def test_ack_trims_and_resume_is_only_for_the_same_principal(store: Store):
    await store.create_session("s", "user:a", "ingress-0")
    await store.publish([publication("fleet/x", n, Recipient("s")) for n in range(3)])
    assert await store.ack("s", 2, None) == 2
    assert [seq for seq, _ in await store.session_messages("s", 1, 10)] == [3]
    assert await store.claim_session("s", "user:intruder", "ingress-1") is None
    record = await store.claim_session("s", "user:a", "ingress-1")
    assert record is not None and (record.seq, record.acked) == (3, 2)


async def test_commands_reach_their_drone_in_order_whichever_script_runs_first(store: Store):
    await store.create_session("d", "drone:7", "ingress-0")
    await store.publish([publication("drone/7/cmd", "c1"), publication("drone/7/cmd", "c2")])
    # A third command whose plan already counts the drone's session as subscribed runs before
    # the drone's subscribe copies the first two: it must not overtake them.
    [third] = await store.publish([publication("drone/7/cmd", "c3", Recipient("d", owner=True))])
    assert third.seqs == (3,)  # type: ignore[union-attr]
    assert await store.bind_commands("d", "7") == []  # nothing left unseen
    queued = await store.session_messages("d", 1, 10)
    assert [codec.decode_frame(f)["data"] for _, f in queued] == ["c1", "c2", "c3"]
    # Acked commands leave the drone's queue: a fresh session of the drone gets none of them.
    await store.ack("d", 3, "7")
    await store.create_session("d2", "drone:7", "ingress-0")
    assert await store.bind_commands("d2", "7") == []


async def test_a_session_hash_lost_in_redis_is_recreated_consistent_with_its_queue(store: Store):
    await store.create_session("s", "user:a", "ingress-0")
    await store.publish([publication("fleet/x", n, Recipient("s")) for n in range(5)])
    await store.ack("s", 2, None)
    await store._redis.delete(store.keys.session("s"))  # Redis lost the hash, not the queue
    await store.touch_sessions({"s": ("user:a", ["fleet/x"])}, "ingress-0")
    [more] = await store.publish([publication("fleet/x", 5, Recipient("s"))])
    assert more.seqs == (6,)  # type: ignore[union-attr]
    record = await store.claim_session("s", "user:a", "ingress-0")
    assert record is not None and (record.seq, record.acked) == (6, 2)


async def test_a_batch_is_stored_in_order_in_one_call(store: Store):
    """Hundreds of messages on several topics in one call: each session's seqs follow the
    batch's order with no gap, each topic's offsets increase, and an id repeated inside the
    batch is recognised there and then."""
    await store.create_session("a", "user:a", "ingress-0")
    await store.create_session("b", "user:b", "ingress-0")
    batch = [
        publication(f"fleet/t{n % 3}", n, Recipient("a"), *([Recipient("b")] if n % 2 else []))
        for n in range(600)
    ]
    repeat = publication("fleet/t0", "again", Recipient("a"), msg_id=batch[0].msg_id)
    outcomes = await store.publish([*batch, repeat])
    stored = outcomes[:600]
    assert all(not o.duplicate for o in stored)  # type: ignore[union-attr]
    assert [o.seqs[0] for o in stored] == list(range(1, 601))  # type: ignore[union-attr]
    assert [o.seqs[1] for o in stored[1::2]] == list(range(1, 301))  # type: ignore[union-attr]
    for topic in range(3):
        offsets = [o.offset for o in stored[topic::3]]  # type: ignore[union-attr]
        as_pairs = [tuple(int(x) for x in offset.split("-")) for offset in offsets]
        assert as_pairs == sorted(as_pairs)
    assert outcomes[600].duplicate and outcomes[600].offset == stored[0].offset  # type: ignore[union-attr]
    delivered = await store.session_messages("a", 1, 1000)
    assert [codec.decode_frame(frame)["data"] for _, frame in delivered] == list(range(600))
