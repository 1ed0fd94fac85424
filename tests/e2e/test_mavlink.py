"""The MAVLink bridge against a real router and a simulated vehicle (MAVLink 2 over UDP on
127.0.0.1, tests/e2e/mavlink_vehicle.py): telemetry and events in, commands out, presence."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymavlink.dialects.v20 import common as mav

from sentientedge import auth
from sentientedge.client import Client, Message
from sentientedge.mavlink import RetryPolicy
from sentientedge.mavlink_bridge import Bridge, BridgeSettings
from tests.e2e.mavlink_vehicle import SimVehicle
from tests.e2e.support import SENTIENTEDGE, Router
from tests.helpers import REPO, eventually, free_port

BRIDGE = (SENTIENTEDGE, "mavlink")
# Answers come fast on loopback: a short interval keeps the timeout case short.
RETRY = RetryPolicy(interval_s=0.5, tries=3)


def _id() -> str:
    return f"mav-{uuid.uuid4().hex[:8]}"


async def next_live(client: Client, topic: str, timeout: float = 20.0, **match: Any) -> Message:
    """The next message on ``topic`` (not a retained copy) whose data has the fields ``match``."""
    deadline = time.monotonic() + timeout
    while True:
        message = await client.recv(timeout=max(0.0, deadline - time.monotonic()))
        if message.topic != topic or message.retained:
            continue
        data = message.data
        if all(isinstance(data, dict) and data.get(k) == v for k, v in match.items()):
            return message


async def next_status(client: Client, topic: str, online: bool, timeout: float = 20.0) -> Any:
    """The next presence message saying ``online`` (a retained one counts: it is the state)."""
    deadline = time.monotonic() + timeout
    while True:
        message = await client.recv(timeout=max(0.0, deadline - time.monotonic()))
        if message.topic == topic and message.data.get("online") is online:
            return message.data


@contextlib.asynccontextmanager
async def bridged(
    router: Router, drone_id: str, **vehicle_options: Any
) -> AsyncIterator[tuple[SimVehicle, Bridge]]:
    """A simulated vehicle and a bridge for it, in this process; both stopped on the way out."""
    port = free_port()
    settings = BridgeSettings(
        connect=f"udpin:127.0.0.1:{port}",
        drone_id=drone_id,
        api_key=router.api_key(drone_id),
        url=router.url,
        retry=RETRY,
    )
    bridge = Bridge(settings)
    stop = asyncio.Event()
    running = asyncio.create_task(bridge.run(stop))
    vehicle = SimVehicle(port, **vehicle_options).start()
    try:
        yield vehicle, bridge
    finally:
        stop.set()
        try:
            await asyncio.wait_for(running, 15)
            left = [t for t in asyncio.all_tasks() if "Bridge." in t.get_coro().__qualname__]
            await eventually(lambda: all(t.done() for t in left), 5, "the bridge's tasks to end")
        finally:
            vehicle.stop()


async def command(
    operator: Client, drone_id: str, data: dict[str, Any], timeout: float = 20.0
) -> dict[str, Any]:
    """Publish a command as an operator does (QoS 1) and wait for its result, by its id."""
    await operator.publish(f"drone/{drone_id}/cmd", data, qos=1)
    result = await next_live(
        operator, f"drone/{drone_id}/cmd/result", timeout=timeout, id=data.get("id")
    )
    return dict(result.data)


async def test_a_station_receives_decoded_telemetry_and_events(router: Router):
    drone = _id()
    station = await router.person("observer")
    telemetry, events = f"drone/{drone}/telemetry", f"drone/{drone}/event"
    await station.subscribe(telemetry, events)
    async with bridged(router, drone) as (vehicle, bridge):
        first = (await next_live(station, telemetry)).data
        assert first["system"] == 1 and first["autopilot"] == "ardupilotmega"
        assert (first["mode"], first["armed"], first["system_status"]) == (
            "STABILIZE",
            False,
            "standby",
        )
        assert first["position"] == {"lat": 52.0, "lon": 4.3, "alt": 10.0, "relative_alt": 0.0}
        assert first["battery"] == {"voltage": 12.6, "current": 15.0, "remaining": 87}
        assert first["gps"] == {"fix": "3d", "satellites": 14, "hdop": 0.8, "vdop": 1.2}
        assert set(first["attitude"]) == {
            "roll",
            "pitch",
            "yaw",
            "rollspeed",
            "pitchspeed",
            "yawspeed",
        }
        assert first["attitude"]["roll"] == pytest.approx(0.57, abs=0.01)  # 0.01 rad
        # At the vehicle's rate (50 Hz), give or take a busy machine: one per position message.
        start, count = time.monotonic(), 0
        while time.monotonic() - start < 2.0:
            await next_live(station, telemetry)
            count += 1
        assert count >= 40, f"{count} telemetry messages in 2 s from a 50 Hz vehicle"
        assert bridge.counters["telemetry"] <= vehicle.sent  # never more than the vehicle's

        vehicle.statustext(mav.MAV_SEVERITY_WARNING, "PreArm: Compass not calibrated")
        event = await next_live(station, events, type="statustext")
        assert event.data == {
            "type": "statustext",
            "severity": "warning",
            "text": "PreArm: Compass not calibrated",
        }
        assert event.qos == 1
    await station.close()


async def test_arm_takeoff_and_land_come_back_with_results(router: Router):
    drone = _id()
    operator = await router.person("operator")
    await operator.subscribe(f"drone/{drone}/cmd/result", f"drone/{drone}/telemetry")
    async with bridged(router, drone) as (vehicle, _):
        armed = await command(operator, drone, {"command": "arm", "id": "c1"})
        assert armed["result"] == "accepted" and armed["mav_result"] == 0, armed
        assert armed["command"] == "arm" and armed["tries"] == 1
        took_off = await command(operator, drone, {"command": "takeoff", "alt": 5, "id": "c2"})
        assert took_off["result"] == "accepted", took_off
        # The vehicle flies it, and its telemetry says so.
        up = await next_live(operator, f"drone/{drone}/telemetry", mode="GUIDED", armed=True)
        assert up.data["position"]["relative_alt"] >= 0
        landed = await command(operator, drone, {"command": "land", "id": "c3"})
        assert landed == {**landed, "command": "land", "id": "c3", "result": "accepted"}
        sent = [cmd for cmd, _ in vehicle.commands()]
        assert sent == [
            mav.MAV_CMD_COMPONENT_ARM_DISARM,
            mav.MAV_CMD_NAV_TAKEOFF,
            mav.MAV_CMD_NAV_LAND,
        ]
    await operator.close()


async def test_refusals_unknown_commands_and_silence_each_get_a_result(router: Router):
    drone = _id()
    operator = await router.person("operator")
    await operator.subscribe(f"drone/{drone}/cmd/result")
    refusing = {mav.MAV_CMD_NAV_TAKEOFF: mav.MAV_RESULT_DENIED}
    silent = frozenset({mav.MAV_CMD_NAV_RETURN_TO_LAUNCH})
    async with bridged(router, drone, results=refusing, unanswered=silent) as (vehicle, _):
        denied = await command(operator, drone, {"command": "takeoff", "alt": 10, "id": "t"})
        assert (denied["result"], denied["mav_result"]) == ("denied", 2), denied
        unknown = await command(operator, drone, {"command": "barrel_roll", "id": "u"})
        assert unknown["result"] == "error" and "unknown command" in unknown["error"], unknown
        assert unknown["command"] == "barrel_roll"
        bad = await command(operator, drone, {"command": "goto", "lat": 91, "lon": 0, "id": "g"})
        assert bad["result"] == "error" and "lat" in bad["error"], bad
        timed_out = await command(operator, drone, {"command": "rtl", "id": "r"})
        assert (timed_out["result"], timed_out["tries"]) == ("timeout", RETRY.tries), timed_out
        rtl = [(cmd, n) for cmd, n in vehicle.commands() if cmd == mav.MAV_CMD_NAV_RETURN_TO_LAUNCH]
        assert rtl == [(mav.MAV_CMD_NAV_RETURN_TO_LAUNCH, n) for n in range(RETRY.tries)]
        # A command without an id of its own is answered with its delivery's seq.
        await operator.publish(f"drone/{drone}/cmd", {"command": "disarm"}, qos=1)
        anonymous = await next_live(operator, f"drone/{drone}/cmd/result", command="disarm")
        assert isinstance(anonymous.data["id"], int) and anonymous.data["result"] == "accepted"
    await operator.close()


async def test_a_silent_vehicle_is_reported_offline_and_back_online(router: Router):
    drone = _id()
    station = await router.person("observer")
    status, events = f"drone/{drone}/status", f"drone/{drone}/event"
    await station.subscribe(status, events)
    async with bridged(router, drone) as (vehicle, bridge):
        await next_status(station, status, online=True)
        vehicle.silence()
        silent_at = time.monotonic()
        # Two topics, two shards: the event and the status may arrive in either order.
        seen: dict[str, Any] = {}
        while len(seen) < 2:
            message = await station.recv(timeout=20)
            if message.topic == events and message.data.get("type") == "heartbeat_lost":
                seen["event"] = message.data
            elif message.topic == status and message.data.get("online") is False:
                seen["status"] = message.data
        took = time.monotonic() - silent_at
        assert seen["status"] == {"online": False, "reason": "closed"}
        assert seen["event"]["silent_s"] >= 3.0
        # Offline 3 s after the last heartbeat, which came up to 1 s before the silence.
        assert 2.0 <= took < 10.0, took
        assert not bridge.stats()["connected"]
        vehicle.resume()
        await next_status(station, status, online=True)
        await eventually(lambda: bridge.stats()["connected"], 10, "the bridge to reconnect")
        assert bridge.counters["connections"] == 2
    await station.close()


def _bridge_process(router: Router, drone: str, port: int, key: str) -> subprocess.Popen[str]:
    env = {**router.env, "SENTIENTEDGE_API_KEY": key}
    return subprocess.Popen(
        [
            *BRIDGE,
            *("--connect", f"udpin:127.0.0.1:{port}", "--drone", drone, "--url", router.url),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_the_command_line_bridges_with_the_key_from_the_environment(router: Router):
    drone = _id()
    key = router.api_key(drone)
    station = await router.person("observer")
    await station.subscribe(f"drone/{drone}/telemetry")
    port = free_port()
    process = _bridge_process(router, drone, port, key)
    vehicle = SimVehicle(port, duration_s=60).start()
    try:
        message = await next_live(station, f"drone/{drone}/telemetry", timeout=60)
        assert message.sender == drone and message.data["gps"]["fix"] == "3d"
        process.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(process.communicate, timeout=30)
    finally:
        vehicle.stop()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-2000:]
    assert "connected to the router" in err
    assert key not in out + err


async def test_a_refused_key_stops_the_bridge_without_saying_it(router: Router):
    drone = _id()
    forged = auth.issue_api_key("not-the-routers-secret-" + "x" * 16, drone).key
    port = free_port()
    process = _bridge_process(router, drone, port, forged)
    vehicle = SimVehicle(port, duration_s=60).start()
    try:
        out, err = await asyncio.to_thread(process.communicate, timeout=60)
    finally:
        vehicle.stop()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, err[-2000:]
    assert "refused the drone's credentials" in err and "401" in err
    assert forged not in out + err
    foreign = subprocess.run(
        [*BRIDGE, "--connect", "udpin:127.0.0.1:1", "--drone", "someone-else"],
        cwd=REPO,
        env={**os.environ, "SENTIENTEDGE_API_KEY": router.api_key(drone)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert foreign.returncode == 2
    assert f"issued for drone {drone!r}, not 'someone-else'" in foreign.stderr
    assert router.api_key(drone) not in foreign.stdout + foreign.stderr


async def test_the_bridge_runs_as_a_ray_actor_on_a_chosen_node(router: Router):
    import ray

    drone = _id()
    station = await router.person("observer")
    await station.subscribe(f"drone/{drone}/telemetry")
    port = free_port()
    node = ray.get_runtime_context().get_node_id()
    env = {**router.env, "SENTIENTEDGE_API_KEY": router.api_key(drone)}
    vehicle = SimVehicle(port, duration_s=90).start()
    try:
        started = await asyncio.to_thread(
            router.cli_with, env, "mavlink", "--connect", f"udpin:127.0.0.1:{port}",
            "--drone", drone, "--url", router.url, "--on-node", node[:12],
        )  # fmt: skip
        assert started.returncode == 0, started.stderr[-2000:]
        assert f"mavlink-{drone} runs on node" in started.stdout and node[:12] in started.stdout
        assert router.api_key(drone) not in started.stdout + started.stderr
        message = await next_live(station, f"drone/{drone}/telemetry", timeout=60)
        assert message.sender == drone
        stopped = await asyncio.to_thread(router.cli, "mavlink", "--stop", "--drone", drone)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr[-2000:]
        elsewhere = await asyncio.to_thread(
            router.cli_with, env, "mavlink", "--connect", "udpin:127.0.0.1:1",
            "--drone", drone, "--on-node", "10.255.255.1",
        )  # fmt: skip
        assert elsewhere.returncode == 1 and "no alive Ray node" in elsewhere.stderr
    finally:
        vehicle.stop()
    await station.close()
