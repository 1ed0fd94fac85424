"""A shard's routing and virtual actors, driven with batches as an ingress sends them."""

from __future__ import annotations

from sentientedge import codec, protocol, routing
from sentientedge.routing import ConnectionLimits, ShardCore


def pub(topic: str, sender: str = "7", data: object = 1) -> tuple:
    frame = codec.encode_msgpack(protocol.msg_frame(topic, data, 0, sender, 1000))
    return (routing.PUB, topic, frame, 0, sender, 1000, False, None)


def test_messages_go_once_to_each_ingress_with_a_matching_filter():
    core = ShardCore("shard-0", ConnectionLimits(5, 10))
    core.handle("ingress-0", [(routing.SUB, 1, "drone/+/telemetry")], 0)
    core.handle("ingress-0", [(routing.SUB, 2, "drone/7/telemetry")], 0)
    core.handle("ingress-1", [(routing.SUB, 3, "drone/7/#")], 0)
    result = core.handle("ingress-0", [pub("drone/7/telemetry"), pub("drone/8/telemetry", "8")], 0)
    assert {k: [i[1] for i in v] for k, v in result.deliveries.items()} == {
        "ingress-0": ["drone/7/telemetry", "drone/8/telemetry"],
        "ingress-1": ["drone/7/telemetry"],
    }


def test_requests_are_answered_by_id():
    core = ShardCore("shard-0", ConnectionLimits(2, 10))
    items = [(routing.CONNECT, n, "drone:7", f"c{n}") for n in range(1, 4)]
    assert core.handle("ingress-0", items, 0).replies == [(1, True), (2, True), (3, False)]
    core.handle("ingress-0", [(routing.DISCONNECT, "drone:7", "c1")], 0)
    assert core.handle("ingress-1", [(routing.CONNECT, 9, "drone:7", "c9")], 0).replies == [
        (9, True)
    ]


def test_drone_actor_keeps_last_telemetry_and_online_state():
    core = ShardCore("shard-0", ConnectionLimits(5, 10))
    core.handle("ingress-0", [(routing.CONNECT, 1, "drone:7", "c1")], 0)
    core.handle("ingress-0", [pub("drone/7/telemetry", data={"lat": 1.0})], 0)
    [snapshot] = core.drone_snapshots()
    assert snapshot["online"] and snapshot["last_telemetry"] == {"lat": 1.0}
    core.handle("ingress-0", [(routing.DISCONNECT, "drone:7", "c1")], 0)
    [snapshot] = core.drone_snapshots()
    assert not snapshot["online"] and snapshot["last_telemetry"] == {"lat": 1.0}


def test_forgetting_an_ingress_drops_its_routes_and_connections():
    core = ShardCore("shard-0", ConnectionLimits(1, 10))
    core.handle("ingress-0", [(routing.SUB, 1, "#"), (routing.CONNECT, 2, "drone:7", "c1")], 0)
    core.forget_ingress("ingress-0", 0)
    assert core.handle("ingress-1", [pub("a")], 0).deliveries == {}
    assert core.handle("ingress-1", [(routing.CONNECT, 3, "drone:7", "c2")], 0).replies == [
        (3, True)
    ]


def test_sessions_keep_their_subscriptions():
    core = ShardCore("shard-0", ConnectionLimits(5, 10))
    core.handle(
        "ingress-0",
        [(routing.SESSION_OPEN, "s1", "user:a", "c1"), (routing.SESSION_SUBS, "s1", ("drone/#",))],
        0,
    )
    assert core.actors.sessions["s1"].subscriptions == {"drone/#"}
    core.handle("ingress-0", [(routing.SESSION_CLOSE, "s1")], 5)
    assert core.actors.sessions["s1"].connection_id is None
    assert core.actors.expire_sessions(now_ms=5 + 300_000, ttl_ms=300_000) == 1
