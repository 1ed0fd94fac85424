"""A shard's routing, sessions and virtual actors, driven with batches as an ingress sends them."""

from __future__ import annotations

from sentientedge import codec, protocol, routing
from sentientedge.records import Stored
from sentientedge.routing import ConnectionLimits, ShardCore, command_target


def frame(topic: str, data: object = 1, qos: int = 0, sender: str = "7") -> bytes:
    return codec.encode_msgpack(protocol.msg_frame(topic, data, qos, sender, 1000))


def pub(topic: str, principal: str = "drone:7", data: object = 1, retain: bool = False) -> tuple:
    return (routing.PUB, topic, frame(topic, data), retain, principal, 1000)


def sub(req: int, topic_filter: str, sid: str = "s1", conn: str = "c1", flags: int = 0) -> tuple:
    return (routing.SUB, req, topic_filter, sid, "user:a", conn, flags)


def core() -> ShardCore:
    return ShardCore("shard-0", ConnectionLimits(5, 10))


def test_messages_go_once_to_each_ingress_with_a_matching_filter():
    shard = core()
    shard.handle("ingress-0", [sub(1, "drone/+/telemetry"), sub(2, "drone/7/telemetry")], 0)
    shard.handle("ingress-1", [sub(3, "drone/7/#", sid="s2")], 0)
    result = shard.handle("ingress-0", [pub("drone/7/telemetry"), pub("drone/8/telemetry")], 0)
    assert {k: [i[1] for i in v] for k, v in result.deliveries.items()} == {
        "ingress-0": ["drone/7/telemetry", "drone/8/telemetry"],
        "ingress-1": ["drone/7/telemetry"],
    }


def test_unsubscribe_on_disconnect_keeps_the_session_route():
    shard = core()
    shard.handle("ingress-0", [sub(1, "fleet/a")], 0)
    shard.handle("ingress-0", [(routing.UNSUB, 2, "fleet/a", None, True)], 0)
    assert shard.handle("ingress-0", [pub("fleet/a")], 0).deliveries == {}
    plan = shard.plan(9, "ingress-0", "fleet/a", frame("fleet/a", qos=1), False, "user:b", "m1")
    assert [r.session_id for r in plan.publication.recipients] == ["s1"]


def test_requests_are_answered_by_id():
    shard = core().__class__("shard-0", ConnectionLimits(2, 10))
    items = [(routing.CONNECT, n, "drone:7", f"c{n}") for n in range(1, 4)]
    assert shard.handle("ingress-0", items, 0).replies == [
        ("ingress-0", 1, True),
        ("ingress-0", 2, True),
        ("ingress-0", 3, False),
    ]
    shard.handle("ingress-0", [(routing.DISCONNECT, "drone:7", "c1", "closed")], 0)
    assert shard.handle("ingress-1", [(routing.CONNECT, 9, "drone:7", "c9")], 0).replies == [
        ("ingress-1", 9, True)
    ]


def test_presence_is_planned_on_first_connect_and_last_disconnect():
    shard = core()
    first = shard.handle("ingress-0", [(routing.CONNECT, 1, "drone:7", "c1")], 0)
    assert [p.publication.topic for p in first.durable] == ["drone/7/status"]
    assert codec.decode_frame(first.durable[0].publication.frame)["data"] == {"online": True}
    second = shard.handle("ingress-0", [(routing.CONNECT, 2, "drone:7", "c2")], 0)
    assert second.durable == []
    shard.handle("ingress-0", [(routing.DISCONNECT, "drone:7", "c1", "closed")], 0)
    last = shard.handle("ingress-0", [(routing.DISCONNECT, "drone:7", "c2", "ping timeout")], 0)
    offline = codec.decode_frame(last.durable[0].publication.frame)
    assert offline["data"] == {"online": False, "reason": "ping timeout"}
    assert offline["qos"] == 1 and last.durable[0].publication.retain == 1


def test_drone_actor_keeps_last_telemetry_and_online_state():
    shard = core()
    shard.handle("ingress-0", [(routing.CONNECT, 1, "drone:7", "c1")], 0)
    shard.handle("ingress-0", [pub("drone/7/telemetry", data={"lat": 1.0})], 0)
    [snapshot] = shard.drone_snapshots()
    assert snapshot["online"] and snapshot["last_telemetry"] == {"lat": 1.0}
    shard.handle("ingress-0", [(routing.DISCONNECT, "drone:7", "c1", "closed")], 0)
    [snapshot] = shard.drone_snapshots()
    assert not snapshot["online"] and snapshot["last_telemetry"] == {"lat": 1.0}
    # Someone else publishing on the drone's topic is not the drone.
    shard.handle("ingress-0", [pub("drone/7/telemetry", principal="user:7", data="fake")], 0)
    assert shard.drone_snapshots()[0]["last_telemetry"] == {"lat": 1.0}


def test_new_subscribers_get_retained_and_last_telemetry():
    shard = core()
    shard.handle("ingress-0", [(routing.CONNECT, 1, "drone:7", "c0")], 0)
    shard.handle("ingress-0", [pub("drone/7/telemetry", data={"lat": 2.0})], 0)
    shard.handle(
        "ingress-0", [pub("fleet/a/mode", principal="user:op", data="survey", retain=True)], 0
    )
    result = shard.handle("ingress-1", [sub(1, "#", flags=routing.SUB_SEND_RETAINED)], 0)
    sent = [codec.decode_frame(item[2]) for item in result.deliveries["ingress-1"]]
    assert sorted(f["topic"] for f in sent) == ["drone/7/telemetry", "fleet/a/mode"]
    restored = shard.handle("ingress-1", [sub(2, "#", sid="s2")], 0)
    assert restored.deliveries == {}  # a resumed session's subscription: no replay
    shard.handle("ingress-0", [pub("fleet/a/mode", principal="user:op", data=None, retain=True)], 0)
    assert "fleet/a/mode" not in shard.retained


def test_stored_qos1_goes_to_each_session_with_its_seq():
    shard = core()
    shard.handle("ingress-0", [sub(1, "drone/7/cmd", sid="operator-session")], 0)
    shard.handle(
        "ingress-1", [(routing.SUB, 2, "drone/7/cmd", "drone-session", "drone:7", "c2", 0)], 0
    )
    plan = shard.plan(
        5, "ingress-0", "drone/7/cmd", frame("drone/7/cmd", qos=1), False, "user:a", "m"
    )
    assert plan.publication.command_for == "7"
    owners = {r.session_id: r.owner for r in plan.publication.recipients}
    assert owners == {"operator-session": False, "drone-session": True}
    result = routing.BatchResult()
    seqs = tuple(3 if sid == "operator-session" else -1 for sid, _ in plan.recipients)
    shard.stored(plan, Stored("1-0", False, seqs), result)
    assert result.replies == [("ingress-0", 5, ("ok", "1-0"))]
    assert [(i, item[1], item[2]) for i, items in result.deliveries.items() for item in items] == [
        ("ingress-0", "operator-session", 3)
    ]
    # No record (-1) for a session an ingress holds: its record is on its way, keep routing.
    again = shard.plan(
        6, "ingress-0", "drone/7/cmd", frame("drone/7/cmd", qos=1), False, "user:a", "n"
    )
    assert len(again.publication.recipients) == 2
    # No record for a session away: it expired, no longer routed.
    shard.handle("ingress-1", [(routing.SESSION_AWAY, "drone-session")], 0)
    seq_of = {"operator-session": 4, "drone-session": -1}
    seqs = tuple(seq_of[sid] for sid, _ in again.recipients)
    shard.stored(again, Stored("2-0", False, seqs), routing.BatchResult())
    again = shard.plan(
        6, "ingress-0", "drone/7/cmd", frame("drone/7/cmd", qos=1), False, "user:a", "n"
    )
    assert [r.session_id for r in again.publication.recipients] == ["operator-session"]


def test_a_newer_connection_takes_the_session_over():
    shard = core()
    shard.handle("ingress-0", [(routing.SESSION_OPEN, "s1", "user:a", "c1", 100)], 0)
    result = shard.handle("ingress-1", [(routing.SESSION_OPEN, "s1", "user:a", "c2", 200)], 0)
    assert result.deliveries["ingress-0"] == [
        (routing.CLOSE, "c1", protocol.CloseCode.TAKEN_OVER, "session taken over")
    ]
    shard.handle("ingress-0", [(routing.SESSION_CLOSE, "s1", "c1")], 5)  # the old one closing
    assert shard.actors.sessions["s1"].connection_id == "c2"


def test_an_older_connection_whose_open_arrives_late_is_the_one_closed():
    shard = core()
    shard.handle("ingress-1", [(routing.SESSION_OPEN, "s1", "user:a", "new", 200)], 0)
    result = shard.handle("ingress-0", [(routing.SESSION_OPEN, "s1", "user:a", "old", 100)], 0)
    assert result.deliveries["ingress-0"] == [
        (routing.CLOSE, "old", protocol.CloseCode.TAKEN_OVER, "session taken over")
    ]
    assert shard.actors.sessions["s1"].connection_id == "new"


def test_forgetting_an_ingress_drops_its_routes_and_takes_its_drones_offline():
    shard = core()
    shard.handle("ingress-0", [sub(1, "#"), (routing.CONNECT, 2, "drone:7", "c1")], 0)
    result = shard.forget_ingress("ingress-0", 0)
    assert codec.decode_frame(result.durable[0].publication.frame)["data"] == {
        "online": False,
        "reason": "router process lost",
    }
    assert shard.handle("ingress-1", [pub("a")], 0).deliveries == {}
    assert shard.handle("ingress-1", [(routing.CONNECT, 3, "drone:7", "c2")], 0).replies == [
        ("ingress-1", 3, True)
    ]


def test_command_target():
    assert command_target("drone/7/cmd") == "7"
    assert command_target("drone/7/cmd/result") is None
    assert command_target("fleet/7/cmd") is None


def test_session_routes_expire_once_the_session_is_away_past_its_ttl():
    shard = core()
    shard.handle("ingress-0", [sub(1, "fleet/a", sid="s1"), sub(2, "fleet/a", sid="s2")], 0)
    shard.handle("ingress-0", [(routing.SESSION_AWAY, "s1")], 1_000)
    assert shard.expire_session_routes(now_ms=1_000 + 5_000, ttl_ms=10_000) == 0
    assert shard.expire_session_routes(now_ms=1_000 + 10_001, ttl_ms=10_000) == 1
    plan = shard.plan(9, "ingress-0", "fleet/a", frame("fleet/a", qos=1), False, "user:b", "m1")
    assert [r.session_id for r in plan.publication.recipients] == ["s2"]
    # A session that came back before its TTL is routed again.
    shard.handle("ingress-0", [(routing.SESSION_AWAY, "s2")], 20_000)
    shard.handle("ingress-1", [sub(3, "fleet/a", sid="s2")], 25_000)
    assert shard.expire_session_routes(now_ms=100_000, ttl_ms=10_000) == 0
    # The old ingress saying so late does not mark it away from its new one.
    shard.handle("ingress-0", [(routing.SESSION_AWAY, "s2")], 100_000)
    assert shard.expire_session_routes(now_ms=200_000, ttl_ms=10_000) == 0


def test_a_session_with_nothing_left_on_a_shard_is_forgotten_there():
    shard = core()
    shard.handle("ingress-0", [sub(1, "fleet/a"), sub(2, "fleet/b")], 0)
    shard.handle("ingress-0", [(routing.UNSUB, 3, "fleet/a", "s1", False)], 0)
    assert "s1" in shard.sessions_at
    shard.handle("ingress-0", [(routing.UNSUB, 4, "fleet/b", "s1", False)], 0)
    assert "s1" not in shard.sessions_at and len(shard.session_routes) == 0


def test_release_forgets_what_another_shard_owns_and_keeps_wildcards():
    shard = core()
    shard.handle(
        "ingress-0",
        [
            sub(1, "fleet/mine"),
            sub(2, "fleet/moved", sid="s2"),
            sub(3, "fleet/+", sid="s3"),
            (routing.CONNECT, 4, "drone:7", "c7"),
            (routing.SESSION_OPEN, "s2", "user:a", "c1", 1),
            pub("fleet/moved", principal="user:a", retain=True),
            pub("fleet/mine", principal="user:a", retain=True),
        ],
        0,
    )
    moved = {"fleet/moved", "drone/7", "session/s2"}
    released = shard.release(lambda key: key not in moved)
    assert released == {"routes": 1, "session_routes": 1, "retained": 1, "actors": 2}
    assert "drone:7" not in shard.actors.principals and "s2" not in shard.actors.sessions
    assert set(shard.retained) == {"fleet/mine"}
    assert "s2" not in shard.sessions_at  # nothing of it routed here any more
    # What stays still routes: the owned topic, and the wildcard for the moved one.
    result = shard.handle("ingress-0", [pub("fleet/mine"), pub("fleet/moved")], 0)
    assert [i[1] for i in result.deliveries["ingress-0"]] == ["fleet/mine", "fleet/moved"]
    assert shard.session_routes.match("fleet/moved") == frozenset({"s3"})


def test_a_drone_holds_at_most_its_limit_of_retained_topics():
    shard = ShardCore("shard-0", ConnectionLimits(5, 10, retained_per_drone=3))
    shard.handle("i0", [pub(f"drone/7/t{n}", retain=True) for n in range(5)], 0)
    assert sorted(shard.retained) == ["drone/7/t0", "drone/7/t1", "drone/7/t2"]
    assert shard.counters.retained_refused == 2
    # Updating a topic it holds is fine; clearing one makes room for another.
    shard.handle("i0", [pub("drone/7/t0", data=2, retain=True)], 0)
    shard.handle("i0", [pub("drone/7/t1", data=None, retain=True)], 0)
    shard.handle("i0", [pub("drone/7/t9", retain=True), pub("drone/8/t0", retain=True)], 0)
    assert sorted(shard.retained) == ["drone/7/t0", "drone/7/t2", "drone/7/t9", "drone/8/t0"]
    # QoS 1 past the limit is refused with an answer, and nothing is planned for the store.
    item = (routing.PUB1, 41, "drone/7/t5", frame("drone/7/t5", qos=1), True, "drone:7", "m1")
    result = shard.handle("i0", [item], 0)
    assert result.durable == [] and result.replies[0][:2] == ("i0", 41)
    assert (
        result.replies[0][2][0] == "forbidden"
        and "MAX_RETAINED_PER_DRONE" in result.replies[0][2][1]
    )


def test_an_identity_keeps_at_most_twice_its_connection_limit_of_away_sessions():
    shard = core()  # users: 10 connections, so 20 away sessions routed
    for n in range(25):  # a client reconnecting fresh 25 times, subscribed each time
        shard.handle("i0", [(routing.SUB, n, "fleet/a", f"s{n}", "user:loop", f"c{n}", 0)], 0)
        shard.handle("i0", [(routing.SESSION_AWAY, f"s{n}")], n)
    plan = shard.plan(None, None, "fleet/a", frame("fleet/a", qos=1), False, "user:b", "m1")
    assert sorted(r.session_id for r in plan.publication.recipients) == sorted(
        f"s{n}" for n in range(5, 25)
    )
    assert shard.counters.away_sessions_dropped == 5
    # A session that comes back is no longer away: it does not count, nor is it dropped.
    shard.handle("i0", [(routing.SUB, 99, "fleet/a", "s5", "user:loop", "c99", 0)], 30)
    assert "s5" not in shard.away_sessions["user:loop"]
    shard.handle("i0", [(routing.SUB, 100, "fleet/a", "s100", "user:loop", "c100", 0)], 31)
    shard.handle("i0", [(routing.SESSION_AWAY, "s100")], 31)
    assert "s5" in shard.sessions_at and len(shard.away_sessions["user:loop"]) == 20
    # Another identity is not affected.
    shard.handle("i0", [(routing.SUB, 200, "fleet/a", "t1", "user:other", "c200", 0)], 40)
    shard.handle("i0", [(routing.SESSION_AWAY, "t1")], 40)
    assert "t1" in shard.sessions_at
