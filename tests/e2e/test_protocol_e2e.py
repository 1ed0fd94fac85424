"""The protocol's everyday exchanges over a real connection: welcome, encodings, ping, sub/unsub."""

from __future__ import annotations

import asyncio
import json
import uuid

import msgpack
from websockets.asyncio.client import connect

from sentientedge.client import Client
from tests.e2e.support import Router, next_on


def _id() -> str:
    return uuid.uuid4().hex[:8]


async def test_welcome_comes_first_with_session_server_and_limits(router: Router):
    client = await router.person("observer")
    welcome = client.welcome
    assert welcome.resumed is False
    assert len(welcome.session) >= 16
    assert welcome.server in {"ingress-0", "ingress-1"}
    assert welcome.limits == {"max_frame_bytes": 65536, "rate_hz": 6000 / 60, "queue_size": 1000}
    drone = await router.drone(f"w-{_id()}")
    assert drone.welcome.limits["rate_hz"] == 100
    assert drone.session != client.session
    for c in (client, drone):
        await c.close()


async def _raw_frames(router: Router, subprotocol: str | None) -> tuple[object, object]:
    """Connect without the client library; return the negotiated subprotocol and the welcome."""
    async with connect(
        router.url,
        additional_headers={"Authorization": f"Bearer {router.token('observer', 'raw')}"},
        subprotocols=[subprotocol] if subprotocol else None,  # type: ignore[list-item]
    ) as ws:
        first = await ws.recv()
        # Whatever was negotiated, both kinds of frame are accepted from the client.
        await ws.send(json.dumps({"op": "ping", "id": "text"}))
        pong_after_text = await ws.recv()
        await ws.send(msgpack.packb({"op": "ping", "id": "binary"}))
        pong_after_binary = await ws.recv()
        return ws.subprotocol, (first, pong_after_text, pong_after_binary)


async def test_msgpack_subprotocol_gets_binary_frames(router: Router):
    subprotocol, frames = await _raw_frames(router, "se1.msgpack")
    assert subprotocol == "se1.msgpack"
    assert all(isinstance(f, bytes) for f in frames)
    welcome, pong1, pong2 = (msgpack.unpackb(f) for f in frames)
    assert welcome["op"] == "welcome"
    assert (pong1, pong2) == ({"op": "pong", "id": "text"}, {"op": "pong", "id": "binary"})


async def test_json_subprotocol_and_no_subprotocol_get_text_frames(router: Router):
    for offered in ("se1.json", None):
        subprotocol, frames = await _raw_frames(router, offered)
        assert subprotocol == offered
        assert all(isinstance(f, str) for f in frames)
        assert json.loads(frames[0])["op"] == "welcome"  # type: ignore[arg-type]
        assert json.loads(frames[2]) == {"op": "pong", "id": "binary"}  # type: ignore[arg-type]


async def test_ping_answers_pong_with_the_same_id(router: Router):
    client = await router.person("observer", encoding="json")
    rtt = await client.ping()
    assert rtt > 0
    await client.close()


async def test_unsubscribe_stops_delivery(router: Router):
    drone_id = f"u-{_id()}"
    drone = await router.drone(drone_id)
    station = await router.person("observer")
    topic = f"drone/{drone_id}/event"
    await station.subscribe(topic, "drone/+/event")
    await drone.publish(topic, 1)
    assert (await station.recv(timeout=10)).data == 1
    assert station.recv_nowait() is None  # overlapping filters: delivered once
    assert await station.unsubscribe(topic) == [topic]
    await drone.publish(topic, 2)
    assert (await station.recv(timeout=10)).data == 2  # still subscribed through the wildcard
    await station.unsubscribe("drone/+/event")
    await drone.publish(topic, 3)
    # A marker on a topic still subscribed proves message 3 had its chance to arrive first.
    await station.subscribe(f"drone/{drone_id}/marker")
    await drone.publish(f"drone/{drone_id}/marker", "end")
    assert (await station.recv(timeout=10)).topic == f"drone/{drone_id}/marker"
    for c in (drone, station):
        await c.close()


async def test_each_subscriber_gets_messages_once_and_others_are_unaffected(router: Router):
    drone_id = f"m-{_id()}"
    drone = await router.drone(drone_id)
    stations = [await router.person("observer") for _ in range(4)]
    for s in stations[:3]:
        await s.subscribe(f"drone/{drone_id}/#")
    await stations[3].subscribe(f"drone/{drone_id}/other")
    for n in range(20):
        await drone.publish(f"drone/{drone_id}/telemetry", n)
    topic = f"drone/{drone_id}/telemetry"
    for s in stations[:3]:
        assert [(await next_on(s, topic)).data for _ in range(20)] == list(range(20))
    await drone.publish(f"drone/{drone_id}/other", "x")
    assert (await stations[3].recv(timeout=10)).data == "x"
    for c in (drone, *stations):
        await c.close()


async def test_a_drone_may_use_a_jwt_with_role_drone(router: Router):
    drone_id = f"jwt-{_id()}"
    drone = await Client.connect(router.url, token=router.token("drone", drone_id))
    station = await router.person("observer")
    await station.subscribe(f"drone/{drone_id}/telemetry")
    await drone.publish(f"drone/{drone_id}/telemetry", {"via": "jwt"})
    message = await station.recv(timeout=10)
    assert (message.sender, message.data) == (drone_id, {"via": "jwt"})
    assert await drone.subscribe(f"drone/{drone_id}/cmd") == [f"drone/{drone_id}/cmd"]
    for c in (drone, station):
        await c.close()


async def test_operator_commands_reach_the_drone_and_results_come_back(router: Router):
    drone_id = f"cmd-{_id()}"
    drone = await router.drone(drone_id)
    operator = await router.person("operator", sub="op-1")
    await drone.subscribe(f"drone/{drone_id}/cmd")
    await operator.subscribe(f"drone/{drone_id}/cmd/result")
    await operator.publish(f"drone/{drone_id}/cmd", {"action": "rtl"})
    command = await drone.recv(timeout=10)
    assert (command.sender, command.data) == ("op-1", {"action": "rtl"})
    await drone.publish(f"drone/{drone_id}/cmd/result", {"ok": True})
    assert (await operator.recv(timeout=10)).data == {"ok": True}
    for c in (drone, operator):
        await c.close()


async def test_demo_command_flies_a_fleet_through_the_router(router: Router):
    process = await asyncio.create_subprocess_exec(
        *router.cli_argv(
            "demo", "--url", router.url, "--drones", "3", "--rate", "5", "--duration", "2"
        ),
        env=router.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    last = stdout.decode().strip().splitlines()[-1]
    assert last.startswith("demo done:")
    assert int(last.split()[2]) >= 3 * 5 * 2 * 0.8
