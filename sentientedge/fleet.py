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
    stop: asyncio.Event | None = None,
    start_at: float | None = None,
) -> int:
    """Publish telemetry at ``rate_hz`` until ``duration_s`` passes or ``stop`` is set.

    Ticks are scheduled on absolute times, so a late tick does not slow the drone down; returns
    the number of messages sent.
    """
    topic = f"drone/{drone_id}/telemetry"
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
        await client.publish(topic, telemetry(drone_id, seq, time.time()))
        seq += 1
    return seq
