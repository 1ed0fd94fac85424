"""Simulated drones and ground stations, for the demo, the benchmark and the tests.

A simulated drone flies a circle and publishes realistic telemetry (position, attitude, velocity,
battery, mode) at a fixed rate. Each message carries ``seq`` (per drone, from 0) and ``sent``
(``time.time()`` at send) so receivers can check order and measure latency.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Any

from sentientedge.client import Client


def telemetry(
    drone_id: str, seq: int, now: float, *, origin: tuple[float, float] = (52.0, 4.3)
) -> dict[str, Any]:
    angle = (now / 60.0 + hash(drone_id) % 360 / 57.3) % (2 * math.pi)
    return {
        "seq": seq,
        "sent": now,
        "pos": {
            "lat": round(origin[0] + 0.01 * math.cos(angle), 7),
            "lon": round(origin[1] + 0.01 * math.sin(angle), 7),
            "alt": 120.0,
        },
        "att": {"roll": 0.0, "pitch": 2.5, "yaw": round(math.degrees(angle) % 360, 2)},
        "vel": {
            "vx": round(-5 * math.sin(angle), 3),
            "vy": round(5 * math.cos(angle), 3),
            "vz": 0.0,
        },
        "battery": round(max(0.0, 1.0 - seq * 1e-5), 4),
        "mode": "AUTO",
    }


async def fly(
    client: Client,
    drone_id: str,
    rate_hz: float,
    duration_s: float | None,
    *,
    qos: int = 0,
    stop: asyncio.Event | None = None,
    start_at: float | None = None,
    puback_latencies: list[float] | None = None,
) -> int:
    """Publish telemetry at ``rate_hz`` until ``duration_s`` passes or ``stop`` is set.

    Ticks are scheduled on absolute times, so a late tick does not slow the drone down; returns
    the number of messages sent. With ``qos=1`` the drone publishes events on
    ``drone/{id}/event`` without waiting for each ``puback`` before the next tick, and records
    the time to each ``puback`` in ``puback_latencies``.
    """
    topic = f"drone/{drone_id}/{'event' if qos else 'telemetry'}"
    in_flight: set[asyncio.Task[Any]] = set()
    period = 1.0 / rate_hz
    loop = asyncio.get_running_loop()
    start = loop.time() if start_at is None else start_at
    # Spread drones over the period so they don't all send on the same millisecond.
    start += random.random() * period
    end = None if duration_s is None else start + duration_s
    seq = 0
    while end is None or start + seq * period < end:
        if stop is not None and stop.is_set():
            break
        delay = start + seq * period - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        data = telemetry(drone_id, seq, time.time())
        if qos:
            task = loop.create_task(_publish_durable(client, topic, data, puback_latencies))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        else:
            await client.publish(topic, data)
        seq += 1
    if in_flight:
        await asyncio.gather(*in_flight, return_exceptions=True)
    return seq


async def _publish_durable(
    client: Client, topic: str, data: dict[str, Any], latencies: list[float] | None
) -> None:
    started = time.perf_counter()
    await client.publish(topic, data, qos=1)
    if latencies is not None:
        latencies.append(time.perf_counter() - started)


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]
