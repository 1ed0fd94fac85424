"""QoS 1 through a real router and Redis: puback, seq, resume, commands, retained, presence."""

from __future__ import annotations

import asyncio
import collections
import random
import uuid

import pytest

from sentientedge.client import Client, Message
from sentientedge.errors import ConnectionClosed
from tests.e2e.support import Router, collect, next_on


def _id() -> str:
    return uuid.uuid4().hex[:8]


async def test_puback_after_storage_and_seq_per_session(router: Router):
    fleet = f"f{_id()}"
    station = await router.person("observer", auto_ack=False)
    await station.subscribe(f"fleet/{fleet}/#")
    operator = await router.person("operator")
    acks = [await operator.publish(f"fleet/{fleet}/cmd", {"n": n}, qos=1) for n in range(5)]
    assert all(a is not None and a["op"] == "puback" for a in acks)
    offsets = [a["offset"] for a in acks]  # type: ignore[index]
    assert offsets == sorted(offsets) and len(set(offsets)) == 5
    received = await collect(station, 5, f"fleet/{fleet}/")
    assert [m.data["n"] for m in received] == list(range(5))
    assert [m.seq for m in received] == [1, 2, 3, 4, 5]
    assert all(m.qos == 1 and not m.dup for m in received)
    for c in (station, operator):
        await c.close()


async def test_a_repeated_id_is_acknowledged_but_not_stored_or_delivered_twice(router: Router):
    fleet = f"f{_id()}"
    station = await router.person("observer", auto_ack=False)
    await station.subscribe(f"fleet/{fleet}/x")
    operator = await router.person("operator")
    first = await operator.publish(f"fleet/{fleet}/x", "once", qos=1, id="same-id")
    again = await operator.publish(f"fleet/{fleet}/x", "once", qos=1, id="same-id")
    assert first == again  # same offset: the store recognised the id
    await operator.publish(f"fleet/{fleet}/x", "marker", qos=1)
    got = await collect(station, 2, f"fleet/{fleet}/")
    assert [m.data for m in got] == ["once", "marker"]
    for c in (station, operator):
        await c.close()


async def test_resume_redelivers_unacked_with_dup_before_new_ones(router: Router):
    fleet = f"f{_id()}"
    station = await router.person("observer", sub=f"st-{fleet}", auto_ack=False)
    await station.subscribe(f"fleet/{fleet}/#")
    operator = await router.person("operator")
    for n in range(6):
        await operator.publish(f"fleet/{fleet}/a", n, qos=1)
    first = await collect(station, 6, f"fleet/{fleet}/")
    await station.ack(first[2].seq)  # handled 0..2
    await station.ping()  # the ack is processed before we leave
    session = station.session
    await station.close()
    for n in range(6, 9):  # published while the session is away
        await operator.publish(f"fleet/{fleet}/a", n, qos=1)
    back = await Client.connect(
        router.url, token=router.token("observer", f"st-{fleet}"), session=session, auto_ack=False
    )
    assert back.welcome.resumed is True and back.session == session
    got = await collect(back, 6, f"fleet/{fleet}/")
    assert [m.data for m in got] == [3, 4, 5, 6, 7, 8]
    # 3-5 reached the old connection unacked: flagged. (6-8 were stored for the session while
    # it was away; the router flags everything from before the resume, conservatively.)
    assert all(m.dup for m in got)
    assert [m.seq for m in got] == [4, 5, 6, 7, 8, 9]
    # The subscription came back with the session: new messages arrive, not flagged.
    await operator.publish(f"fleet/{fleet}/a", 9, qos=1)
    [live] = await collect(back, 1, f"fleet/{fleet}/")
    assert (live.data, live.seq, live.dup) == (9, 10, False)
    for c in (back, operator):
        await c.close()


async def test_another_identity_cannot_resume_a_session(router: Router):
    fleet = f"f{_id()}"
    owner = await router.person("observer", sub=f"owner-{fleet}")
    await owner.subscribe(f"fleet/{fleet}/#")
    session = owner.session
    await owner.close()
    operator = await router.person("operator")
    await operator.publish(f"fleet/{fleet}/secret", "for the owner", qos=1)
    thief = await Client.connect(
        router.url, token=router.token("observer", f"thief-{fleet}"), session=session
    )
    assert thief.welcome.resumed is False and thief.session != session
    await thief.subscribe(f"fleet/{fleet}/marker")
    await operator.publish(f"fleet/{fleet}/marker", "m", qos=1)
    got = await collect(thief, 1, f"fleet/{fleet}/")
    assert [m.topic for m in got] == [f"fleet/{fleet}/marker"]
    for c in (thief, operator):
        await c.close()


async def test_a_second_connection_takes_the_session_over(router: Router):
    sub = f"takeover-{_id()}"
    first = await router.person("observer", sub=sub)
    second = await Client.connect(
        router.url, token=router.token("observer", sub), session=first.session
    )
    assert second.welcome.resumed is True
    assert await first.wait_closed(timeout=10) == 4000
    assert await second.ping() > 0  # the newer one is fine
    await second.close()


async def test_command_to_an_offline_drone_arrives_when_it_connects(router: Router):
    drone_id = f"cmd-{_id()}"
    operator = await router.person("operator", sub=f"op-{drone_id}")
    await operator.subscribe(f"drone/{drone_id}/cmd/result")
    ack = await operator.publish(f"drone/{drone_id}/cmd", {"action": "goto", "n": 1}, qos=1)
    assert ack is not None
    await operator.publish(f"drone/{drone_id}/cmd", {"action": "land", "n": 2}, qos=1)
    drone = await router.drone(drone_id, auto_ack=False)  # a fresh connection, never seen before
    await drone.subscribe(f"drone/{drone_id}/cmd")
    commands = await collect(drone, 2, f"drone/{drone_id}/cmd")
    assert [c.data["n"] for c in commands] == [1, 2]
    assert all(c.qos == 1 and c.sender == f"op-{drone_id}" for c in commands)
    await drone.ack(commands[-1].seq)
    await drone.publish(f"drone/{drone_id}/cmd/result", {"n": 2, "ok": True}, qos=1)
    result = await next_on(operator, f"drone/{drone_id}/cmd/result")
    assert result.data == {"n": 2, "ok": True}
    await drone.ping()
    await drone.close()
    # Acknowledged commands are done: a new connection does not get them again.
    again = await router.drone(drone_id, auto_ack=False)
    await again.subscribe(f"drone/{drone_id}/cmd")
    await operator.publish(f"drone/{drone_id}/cmd", {"n": 3}, qos=1)
    [third] = await collect(again, 1, f"drone/{drone_id}/cmd")
    assert third.data == {"n": 3}
    for c in (again, operator):
        await c.close()


async def test_unacked_commands_reach_the_drone_on_a_fresh_connection(router: Router):
    drone_id = f"cmd2-{_id()}"
    drone = await router.drone(drone_id, auto_ack=False)
    await drone.subscribe(f"drone/{drone_id}/cmd")
    operator = await router.person("operator")
    await operator.publish(f"drone/{drone_id}/cmd", "takeoff", qos=1)
    [first] = await collect(drone, 1, f"drone/{drone_id}/cmd")
    assert first.data == "takeoff"
    await drone.close()  # never acked
    fresh = await router.drone(drone_id, auto_ack=False)  # a new session, not a resume
    assert fresh.welcome.resumed is False
    await fresh.subscribe(f"drone/{drone_id}/cmd")
    [again] = await collect(fresh, 1, f"drone/{drone_id}/cmd")
    assert again.data == "takeoff"
    for c in (fresh, operator):
        await c.close()


async def test_retained_message_goes_first_to_new_subscribers(router: Router):
    fleet = f"f{_id()}"
    operator = await router.person("operator")
    await operator.publish(f"fleet/{fleet}/mode", "old", retain=True)
    await operator.publish(f"fleet/{fleet}/mode", "survey", qos=1, retain=True)
    await operator.publish(f"fleet/{fleet}/other", "not retained", qos=1)
    late = await router.person("observer")
    await late.subscribe(f"fleet/{fleet}/#")
    first = await late.recv(timeout=10)
    assert (first.topic, first.data, first.retained) == (f"fleet/{fleet}/mode", "survey", True)
    await operator.publish(f"fleet/{fleet}/mode", "live", qos=1)
    assert (await next_on(late, f"fleet/{fleet}/mode")).retained is False
    # A retained publication with null data clears it.
    await operator.publish(f"fleet/{fleet}/mode", None, qos=1, retain=True)
    later = await router.person("observer")
    await later.subscribe(f"fleet/{fleet}/#")
    await operator.publish(f"fleet/{fleet}/marker", 1, qos=1)
    assert (await later.recv(timeout=10)).topic == f"fleet/{fleet}/marker"
    for c in (operator, late, later):
        await c.close()


async def test_presence_online_offline_and_retained(router: Router):
    drone_id = f"pr-{_id()}"
    station = await router.person("observer")
    await station.subscribe(f"drone/{drone_id}/status")
    drone = await router.drone(drone_id)
    online = await next_on(station, f"drone/{drone_id}/status")
    assert (online.data, online.qos, online.sender) == ({"online": True}, 1, "$router")
    second = await router.drone(drone_id)  # a second connection is no news
    await second.close()
    late = await router.person("observer")
    await late.subscribe(f"drone/{drone_id}/status")
    retained = await late.recv(timeout=10)
    assert (retained.data, retained.retained) == ({"online": True}, True)
    await drone.close()
    offline = await next_on(station, f"drone/{drone_id}/status")
    assert offline.data == {"online": False, "reason": "closed"}
    for c in (station, late):
        await c.close()


async def test_a_drone_that_goes_silent_is_reported_offline(router: Router):
    drone_id = f"silent-{_id()}"
    station = await router.person("observer")
    await station.subscribe(f"drone/{drone_id}/status")
    drone = await router.drone(drone_id)
    assert (await next_on(station, f"drone/{drone_id}/status")).data["online"] is True
    drone.transport.pause_reading()  # alive but deaf: pings go unanswered
    offline = await next_on(station, f"drone/{drone_id}/status", timeout=20)
    assert offline.data == {"online": False, "reason": "ping timeout"}
    drone.transport.abort()
    await station.close()


async def test_a_thousand_qos1_messages_to_subscribers_that_come_and_go(router: Router):
    """Subscribers drop and resume at random points; each ends with every message, in order."""
    fleet = f"f{_id()}"
    topics = [f"fleet/{fleet}/t{i}" for i in range(4)]
    rng = random.Random(7)
    subscribers = []
    for n in range(3):
        client = await router.person("observer", sub=f"churn-{fleet}-{n}", auto_ack=False)
        await client.subscribe(f"fleet/{fleet}/#")
        subscribers.append(client)
    sessions = [s.session for s in subscribers]
    operator = await router.person("operator")
    received: list[list[Message]] = [[] for _ in subscribers]
    publish_done = asyncio.Event()

    async def publish_all() -> None:
        for n in range(1000):
            await operator.publish(topics[n % 4], {"n": n}, qos=1)
        publish_done.set()

    async def consume(index: int) -> None:
        client = subscribers[index]
        while True:
            try:
                message = await client.recv(timeout=0.5)
            except (asyncio.TimeoutError, ConnectionClosed):
                message = None
            if message is not None and message.topic.startswith(f"fleet/{fleet}/"):
                received[index].append(message)
                if rng.random() < 0.7:
                    await client.ack(message.seq)  # type: ignore[arg-type]
            if rng.random() < 0.01 or client.closed:  # drop the connection, come back later
                await client.close()
                await asyncio.sleep(rng.random() * 0.2)
                client = await Client.connect(
                    router.url,
                    token=router.token("observer", f"churn-{fleet}-{index}"),
                    session=sessions[index],
                    auto_ack=False,
                )
                assert client.welcome.resumed
                subscribers[index] = client
            unique = {m.data["n"] for m in received[index]}
            if publish_done.is_set() and len(unique) == 1000:
                await client.ack(max(m.seq for m in received[index] if m.seq))
                return

    await asyncio.wait_for(
        asyncio.gather(publish_all(), *(consume(i) for i in range(3))), timeout=240
    )
    for messages in received:
        per_topic: dict[str, list[int]] = collections.defaultdict(list)
        first_seen: set[int] = set()
        for m in messages:
            n = m.data["n"]
            if n in first_seen:
                assert m.dup, f"message {n} delivered twice without dup"
            first_seen.add(n)
            per_topic[m.topic].append(n)
        assert first_seen == set(range(1000))
        for topic, ns in per_topic.items():
            deduped = list(dict.fromkeys(ns))
            assert deduped == sorted(deduped), f"{topic} out of publish order"
    for c in (*subscribers, operator):
        await c.close()


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_client_library_reconnects_resends_and_acks(router: Router, encoding: str):
    fleet = f"f{_id()}"
    station = await router.person("observer", sub=f"lib-{fleet}", reconnect=True, encoding=encoding)
    await station.subscribe(f"fleet/{fleet}/#")
    operator = await router.person("operator", sub=f"libop-{fleet}", reconnect=True)
    got: list[int] = []
    for n in range(40):
        if n == 15:
            station.transport.abort()  # the network drops both ways, no close handshake
        if n == 25:
            operator.transport.abort()
        await operator.publish(f"fleet/{fleet}/x", n, qos=1)
    while len(got) < 40:
        message = await station.recv(timeout=20)
        if message.topic == f"fleet/{fleet}/x":
            got.append(message.data)
    assert got == list(range(40))  # each once, in order: resumed, resent, deduplicated
    assert station.reconnects >= 1 and operator.reconnects >= 1
    for c in (station, operator):
        await c.close()


async def test_commands_published_while_the_drone_subscribes_stay_in_order(router: Router):
    drone_id = f"race-{_id()}"
    operator = await router.person("operator")

    async def command_stream() -> None:
        for n in range(40):
            await operator.publish(f"drone/{drone_id}/cmd", {"n": n}, qos=1)

    async def drone_side() -> list[int]:
        await asyncio.sleep(0.05)  # let the stream start first: subscribe in its middle
        drone = await router.drone(drone_id)
        await drone.subscribe(f"drone/{drone_id}/cmd")
        got = [m.data["n"] for m in await collect(drone, 40, f"drone/{drone_id}/cmd")]
        await drone.close()
        return got

    _, received = await asyncio.gather(command_stream(), drone_side())
    assert received == list(range(40))
    await operator.close()
