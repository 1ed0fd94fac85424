"""End to end through a real router: drones publish telemetry, ground stations receive it."""

from __future__ import annotations

import asyncio
import collections

from sentientedge.client import Client
from sentientedge.fleet import fly
from tests.e2e.support import Router


async def _drain(station: Client, expected: int, timeout: float) -> list:
    received = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(received) < expected:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            message = await station.recv(timeout=remaining)
        except asyncio.TimeoutError:
            break
        if not message.retained:  # last telemetry of drones from earlier tests
            received.append(message)
    return received


async def _fleet_run(
    router: Router, drones: int, rate_hz: float, seconds: float, encodings: list[str]
):
    wildcard = await router.person("observer", encoding=encodings[0])
    single = await router.person("observer", encoding=encodings[-1])
    assert await wildcard.subscribe("drone/+/telemetry") == ["drone/+/telemetry"]
    assert await single.subscribe("drone/7/telemetry") == ["drone/7/telemetry"]
    fleet = [
        await router.drone(str(i), encoding=encodings[i % len(encodings)]) for i in range(drones)
    ]
    sent = await asyncio.gather(
        *(fly(client, str(i), rate_hz, seconds) for i, client in enumerate(fleet))
    )
    total = sum(sent)
    everything = await _drain(wildcard, total, timeout=30)
    sevens = await _drain(single, sent[7], timeout=30)
    for client in (*fleet, wildcard, single):
        await client.close()
    return sent, everything, sevens


def _check_per_drone_order(sent: list[int], received: list) -> None:
    by_drone: dict[str, list[int]] = collections.defaultdict(list)
    for message in received:
        by_drone[message.sender].append(message.data["seq"])
    for drone, count in enumerate(sent):
        assert by_drone[str(drone)] == list(range(count)), f"drone {drone} out of order or lost"


async def test_fifty_drones_at_fifty_hz_reach_wildcard_and_single_subscribers(router: Router):
    sent, everything, sevens = await _fleet_run(router, 50, 50, 5, ["msgpack"])
    assert sum(sent) >= 50 * 50 * 5 * 0.95  # the drones really flew at 50 Hz for 5 s
    assert len(everything) == sum(sent)
    _check_per_drone_order(sent, everything)
    assert [m.data["seq"] for m in sevens] == list(range(sent[7]))
    assert {m.topic for m in sevens} == {"drone/7/telemetry"}
    assert all(m.sender == "7" and m.qos == 0 for m in sevens)


async def test_json_and_msgpack_clients_mixed(router: Router):
    sent, everything, sevens = await _fleet_run(router, 50, 50, 5, ["json", "msgpack"])
    assert len(everything) == sum(sent)
    _check_per_drone_order(sent, everything)
    assert [m.data["seq"] for m in sevens] == list(range(sent[7]))
    # A message published by a JSON drone reaches a MessagePack subscriber unchanged, and back.
    first = everything[0].data
    assert set(first) == {"seq", "sent", "pos", "att", "vel", "battery", "mode"}
