"""What survives: Redis killed and restarted from its append-only file, and flow control.

A router of its own with an embedded Redis (so the test may kill it), `appendfsync always` (so
"acknowledged" means "on disk" without waiting out an fsync interval) and a small unacked window.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator

import pytest

from sentientedge.client import Client
from sentientedge.errors import ServerError
from tests.e2e.support import RedisServer, Router, collect, embedded_router, next_on
from tests.helpers import eventually

WINDOW = 20


@pytest.fixture(scope="module")
def durable_router(
    ray_cluster: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Router]:
    with embedded_router(
        ray_cluster,
        redis_server,
        tmp_path_factory.mktemp("durable-state"),
        REDIS_APPENDFSYNC="always",
        MAX_UNACKED=str(WINDOW),
        RATE_LIMIT_MAX="6000",
    ) as started:
        yield started


def _id() -> str:
    return uuid.uuid4().hex[:8]


async def test_acknowledged_messages_survive_redis_killed_and_restarted(durable_router: Router):
    router = durable_router
    fleet = f"k{_id()}"
    station = await router.person("observer", sub=f"st-{fleet}", auto_ack=False)
    await station.subscribe(f"fleet/{fleet}/#")
    session = station.session
    await station.close()  # the station is away: everything waits in Redis for it
    operator = await router.person("operator")
    acked = [await operator.publish(f"fleet/{fleet}/cmd", n, qos=1) for n in range(50)]
    assert all(a is not None for a in acked)

    redis = router.embedded_redis
    os.kill(int(redis.pidfile.read_text()), signal.SIGKILL)
    try:
        # While Redis is down: QoS 1 is refused, nothing is acknowledged; QoS 0 goes on.
        watcher = await router.person("observer")
        await watcher.subscribe(f"fleet/{fleet}/live")

        async def refused() -> bool:
            try:
                await operator.publish(f"fleet/{fleet}/cmd", "during", qos=1, timeout=1)
            except ServerError as exc:
                return exc.code == "unavailable"
            return False

        await eventually(refused, 20, "qos 1 refused while redis is down")
        await operator.publish(f"fleet/{fleet}/live", "qos0 during outage")
        assert (await next_on(watcher, f"fleet/{fleet}/live")).data == "qos0 during outage"
        await watcher.close()
    finally:
        redis.start()  # from its append-only file

    # Without restarting the router, QoS 1 works again...
    async def accepted() -> bool:
        try:
            return await operator.publish(f"fleet/{fleet}/cmd", 50, qos=1, timeout=5) is not None
        except ServerError:
            return False

    await eventually(accepted, 30, "qos 1 accepted once redis is back")
    # ...and every message acknowledged before the kill is still delivered, in order (the
    # client acknowledges as it goes: the window is small).
    back = await Client.connect(
        router.url, token=router.token("observer", f"st-{fleet}"), session=session
    )
    assert back.welcome.resumed
    got = await collect(back, 51, f"fleet/{fleet}/cmd", timeout=20)
    values = [m.data for m in got]
    assert values[:50] == list(range(50))
    assert 50 in values[50:]
    for c in (back, operator):
        await c.close()


async def test_a_session_that_does_not_ack_stops_receiving_and_loses_nothing(
    durable_router: Router,
):
    router = durable_router
    fleet = f"w{_id()}"
    slow = await router.person("observer", sub=f"slow-{fleet}", auto_ack=False)
    await slow.subscribe(f"fleet/{fleet}/#")
    operator = await router.person("operator")
    for n in range(3 * WINDOW):
        await operator.publish(f"fleet/{fleet}/x", n, qos=1)
    first = await collect(slow, WINDOW, f"fleet/{fleet}/")
    assert [m.data for m in first] == list(range(WINDOW))
    # The window is full: nothing more arrives until the client acknowledges.
    await operator.publish(f"fleet/{fleet}/x", "probe", qos=1)
    await slow.ping()
    assert slow.recv_nowait() is None
    await slow.ack(first[-1].seq)  # type: ignore[arg-type]
    second = await collect(slow, WINDOW, f"fleet/{fleet}/")
    assert [m.data for m in second] == list(range(WINDOW, 2 * WINDOW))
    await slow.ack(second[-1].seq)  # type: ignore[arg-type]
    third = await collect(slow, WINDOW, f"fleet/{fleet}/")
    assert [m.data for m in third] == list(range(2 * WINDOW, 3 * WINDOW))
    await slow.ack(third[-1].seq)  # type: ignore[arg-type]
    [probe] = await collect(slow, 1, f"fleet/{fleet}/")
    assert probe.data == "probe"
    for c in (slow, operator):
        await c.close()
