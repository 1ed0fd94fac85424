"""Every bad input of the protocol gets its answer, and loses nothing else."""

from __future__ import annotations

import asyncio
import uuid

import msgpack
import pytest

from sentientedge import auth
from sentientedge.client import Client
from sentientedge.errors import ConnectRejected, ServerError
from sentientedge.fleet import fly
from tests.e2e.support import API_KEY_SECRET, Router


def _id() -> str:
    return uuid.uuid4().hex[:8]


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture
async def station(router: Router):
    client = await router.person("observer", encoding="json")
    yield client
    await client.close()


async def _still_works(router: Router, client: Client, drone_id: str) -> None:
    """After an error the connection still carries messages both ways."""
    watcher = await router.person("observer")
    await watcher.subscribe(f"drone/{drone_id}/event")
    await client.publish(f"drone/{drone_id}/event", {"after": "error"})
    message = await watcher.recv(timeout=10)
    assert (message.topic, message.data) == (f"drone/{drone_id}/event", {"after": "error"})
    await watcher.close()


@pytest.mark.parametrize(
    "raw, code",
    [
        ("{not json", "bad_frame"),
        (b"\xc1\xc1", "bad_frame"),
        ("[1, 2, 3]", "bad_frame"),
        (msgpack.packb("just a string"), "bad_frame"),
        ('{"topic": "drone/x/event"}', "bad_frame"),
        ('{"op": "launch", "id": "u1"}', "unknown_op"),
        ('{"op": "pub", "topic": "drone//event", "data": 1, "id": "t1"}', "bad_topic"),
        ('{"op": "pub", "topic": "drone/+/event", "data": 1}', "bad_topic"),
        ('{"op": "pub", "topic": "drone/x/event", "data": 1, "qos": 2}', "bad_frame"),
        ('{"op": "pub", "topic": "drone/x/event", "data": 1, "qos": 1}', "bad_frame"),
        ('{"op": "sub", "topics": "drone/#"}', "bad_frame"),
        ('{"op": "sub", "topics": ["drone/#/x"], "id": "s9"}', "bad_topic"),
        ('{"op": "ack", "seq": "three"}', "bad_frame"),
    ],
)
async def test_bad_frames_get_an_error_and_the_connection_carries_on(router: Router, raw, code):
    drone_id = f"bad-{_id()}"
    drone = await router.drone(drone_id)
    await drone.send_raw(raw)
    error = await drone.next_error(timeout=10)
    assert error["op"] == "error" and error["code"] == code and error["msg"]
    if code in ("unknown_op", "bad_topic") and '"id"' in raw:
        assert error["id"] in ("u1", "t1", "s9")
    await _still_works(router, drone, drone_id)
    await drone.close()


async def test_unknown_op_is_answered_with_its_id(router: Router):
    drone = await router.drone(f"op-{_id()}")
    await drone.send_frame({"op": "launch", "id": "x7"})
    error = await drone.next_error(timeout=10)
    assert (error["code"], error["id"]) == ("unknown_op", "x7")
    await drone.close()


async def test_publish_outside_permissions_is_forbidden(router: Router, station: Client):
    drone_id = f"perm-{_id()}"
    drone = await router.drone(drone_id)
    forbidden = ("drone/someone-else/telemetry", f"drone/{drone_id}/cmd", "fleet/alpha/x")
    await station.subscribe(*forbidden, f"drone/{drone_id}/event")
    for topic in (
        "drone/someone-else/telemetry",
        f"drone/{drone_id}/cmd",
        "fleet/alpha/x",
        "$sys/x",
    ):
        await drone.send_frame({"op": "pub", "topic": topic, "data": 1, "id": "p1"})
        error = await drone.next_error(timeout=10)
        assert (error["code"], error["id"]) == ("forbidden", "p1"), topic
    observer = await router.person("observer")
    await observer.send_frame({"op": "pub", "topic": "fleet/alpha/x", "data": 1})
    assert (await observer.next_error(timeout=10))["code"] == "forbidden"
    # What follows still is delivered, and nothing forbidden was: a refused publication never
    # leaves the ingress, so by the time the later message arrives it would have been there.
    await _still_works(router, drone, drone_id)
    seen = [await station.recv(timeout=10)]
    while (extra := station.recv_nowait()) is not None:
        seen.append(extra)
    assert [m.topic for m in seen if not m.retained] == [f"drone/{drone_id}/event"]
    await observer.close()
    await drone.close()


async def test_subscribe_outside_permissions(router: Router):
    drone_id = f"subperm-{_id()}"
    drone = await router.drone(drone_id)
    with pytest.raises(ServerError) as info:
        await drone.subscribe("drone/+/telemetry")
    assert info.value.code == "forbidden"
    # Partly allowed: only the allowed filters are granted.
    granted = await drone.subscribe(f"drone/{drone_id}/cmd", "drone/other/cmd", "fleet/#")
    assert granted == [f"drone/{drone_id}/cmd", "fleet/#"]
    await drone.close()


async def test_oversized_frame_closes_with_1009(router: Router):
    drone_id = f"big-{_id()}"
    drone = await router.drone(drone_id)
    assert drone.welcome.limits["max_frame_bytes"] == 65536
    await drone.publish(f"drone/{drone_id}/event", "x" * 60_000)  # under the limit: fine
    await drone.publish(f"drone/{drone_id}/event", "x" * 70_000)
    assert await drone.wait_closed(timeout=10) == 1009


@pytest.mark.parametrize(
    "credentials, reason",
    [
        ({}, "no credentials"),
        ({"token": "garbage"}, "malformed"),
        ({"token": auth.mint_jwt("wrong-secret-" + "x" * 20, "a", "operator", 60)}, "signature"),
        ({"token": "EXPIRED"}, "expired"),
        ({"api_key": "sek1.Zm9v.0123.forged"}, "invalid"),
        ({"api_key": "not-a-key"}, "malformed"),
    ],
)
async def test_bad_credentials_get_401_and_no_socket(router: Router, credentials, reason):
    if credentials.get("token") == "EXPIRED":
        credentials = {"token": router.token("operator", "late", ttl=-5)}
    for use_query in (False, True):
        with pytest.raises(ConnectRejected) as info:
            await Client.connect(router.url, use_query=use_query, **credentials)
        assert info.value.status == 401
        assert info.value.body["error"] == "unauthorized"
        assert reason in info.value.body["reason"]


async def test_revoked_api_key_gets_401(router: Router):
    drone_id = f"rev-{_id()}"
    key = auth.issue_api_key(API_KEY_SECRET, drone_id).key
    drone = await Client.connect(router.url, api_key=key)
    await drone.close()
    result = router.cli("keys", "revoke", key)
    assert result.returncode == 0, result.stderr
    with pytest.raises(ConnectRejected) as info:
        await Client.connect(router.url, api_key=key)
    assert (info.value.status, info.value.body["reason"]) == (401, "api key revoked")
    # Another key for the same drone still works.
    fresh = await Client.connect(
        router.url, api_key=auth.issue_api_key(API_KEY_SECRET, drone_id).key
    )
    await fresh.close()


async def test_sixth_connection_of_a_drone_gets_429(router: Router):
    drone_id = f"many-{_id()}"
    connections = [await router.drone(drone_id) for _ in range(5)]
    with pytest.raises(ConnectRejected) as info:
        await router.drone(drone_id)
    assert info.value.status == 429
    await connections[0].close()

    async def sixth_fits() -> Client | None:
        try:
            return await router.drone(drone_id)
        except ConnectRejected:
            return None

    replacement = None
    for _ in range(100):  # the closed connection is released asynchronously
        replacement = await sixth_fits()
        if replacement is not None:
            break
        await asyncio.sleep(0.05)
    assert replacement is not None, "a slot freed by a closed connection was never reusable"
    for client in (*connections[1:], replacement):
        await client.close()


async def test_eleventh_connection_of_a_person_gets_429(router: Router):
    token = router.token("observer", f"crowd-{_id()}")
    connections = [await Client.connect(router.url, token=token) for _ in range(10)]
    with pytest.raises(ConnectRejected) as info:
        await Client.connect(router.url, token=token)
    assert info.value.status == 429
    for client in connections:
        await client.close()


async def test_flood_over_the_rate_limit(router: Router):
    drone_id = f"flood-{_id()}"
    drone = await router.drone(drone_id)
    watcher = await router.person("observer")
    await watcher.subscribe(f"drone/{drone_id}/telemetry")
    for n in range(400):  # a burst of 400 against 100 Hz with bursts of 200
        await drone.publish(f"drone/{drone_id}/telemetry", {"n": n})
    error = await drone.next_error(timeout=10)
    assert error["code"] == "rate_limited"
    received = []
    while len(received) < 200:
        received.append((await watcher.recv(timeout=10)).data["n"])
    # What got through is the head of the burst, in order; the rest was dropped, not queued.
    assert received == list(range(200))
    # Far over the limit for long enough: closed with 1008.
    for n in range(3000):
        if drone.closed:
            break
        await drone.publish(f"drone/{drone_id}/telemetry", {"n": n})
    assert await drone.wait_closed(timeout=10) == 1008
    await watcher.close()


async def test_too_many_bad_frames_close_with_1008(router: Router):
    drone = await router.drone(f"spam-{_id()}")
    for _ in range(101):
        await drone.send_raw("{nope")
    assert await drone.wait_closed(timeout=10) == 1008


POISON = [
    # A MessagePack Timestamp (extension type -1), which msgpack decodes by itself.
    msgpack.packb({"op": "pub", "topic": "drone/{id}/telemetry", "data": msgpack.Timestamp(1, 2)}),
    # Data nested 40 deep (the limit is 32 levels, the frame included).
    msgpack.packb({"op": "pub", "topic": "drone/{id}/telemetry", "data": _nested(40)}),
    # A JSON surrogate bomb: lone surrogate escapes nested hundreds deep.
    '{"op":"pub","topic":"drone/{id}/telemetry","data":'
    + '["\\ud800",' * 340
    + "1"
    + "]" * 340
    + "}",
]


async def test_a_poison_message_costs_its_sender_a_bad_frame_and_nobody_else_anything(
    router: Router,
):
    run = _id()
    poisoner_id = f"poison-{run}"
    poisoner = await router.drone(poisoner_id)
    stations = [
        await router.person("observer", encoding="json"),
        await router.person("observer", encoding="msgpack"),
    ]
    for station in stations:
        await station.subscribe("drone/+/telemetry")
    fleet_ids = [f"clean-{run}-{n}" for n in range(20)]
    fleet = [await router.drone(drone_id) for drone_id in fleet_ids]
    stop = asyncio.Event()
    flights = [
        asyncio.create_task(fly(client, drone_id, 20, None, stop=stop))
        for client, drone_id in zip(fleet, fleet_ids, strict=True)
    ]
    await asyncio.sleep(0.5)  # the fleet is flying when the poison arrives
    for raw in POISON:
        if isinstance(raw, bytes):
            raw = raw.replace(b"{id}", poisoner_id.encode())
        else:
            raw = raw.replace("{id}", poisoner_id)
        await poisoner.send_raw(raw)
        error = await poisoner.next_error(timeout=10)
        assert error["code"] == "bad_frame", error
    await asyncio.sleep(0.5)
    stop.set()
    sent = dict(zip(fleet_ids, await asyncio.gather(*flights), strict=True))
    for station in stations:
        seqs: dict[str, list[int]] = {drone_id: [] for drone_id in fleet_ids}
        while any(len(seqs[d]) < sent[d] for d in fleet_ids):
            message = await station.recv(timeout=10)
            if message.sender in seqs and not message.retained:
                seqs[message.sender].append(message.data["seq"])
        for drone_id in fleet_ids:
            assert seqs[drone_id] == list(range(sent[drone_id])), f"gap in {drone_id}'s telemetry"
    await _still_works(router, poisoner, poisoner_id)
    for client in (poisoner, *stations, *fleet):
        await client.close()
