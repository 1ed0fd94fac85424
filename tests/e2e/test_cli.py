"""The CLI against a second, small router that runs its own embedded Redis (no REDIS_URL).

Also where a full server (503) and a dead Redis are tested, since both need a router of their own.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from sentientedge.client import Client
from sentientedge.errors import ConnectRejected
from tests.e2e.support import RedisServer, Router, aget, embedded_router
from tests.helpers import eventually

MAX_CONNECTIONS = 4


@pytest.fixture(scope="module")
def small_router(
    ray_cluster: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Router]:
    with embedded_router(
        ray_cluster,
        redis_server,
        tmp_path_factory.mktemp("small-state"),
        MAX_WS_CONNECTIONS=str(MAX_CONNECTIONS),
    ) as started:
        yield started


async def test_cli_keys_and_tokens_work_against_the_router(small_router: Router):
    result = small_router.cli("keys", "issue", "cli-drone")
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    result = small_router.cli("token", "--role", "observer", "--sub", "cli-station", "--ttl", "10m")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    station = await Client.connect(small_router.url, token=token)
    await station.subscribe("drone/cli-drone/telemetry")
    drone = await Client.connect(small_router.url, api_key=key)
    await drone.publish("drone/cli-drone/telemetry", {"ok": True})
    assert (await station.recv(timeout=10)).data == {"ok": True}
    listing = small_router.cli("keys", "list")
    assert "cli-drone" in listing.stdout and "active" in listing.stdout
    for client in (drone, station):
        await client.close()


def test_status_shows_what_runs(small_router: Router):
    result = small_router.cli("status", "--address", small_router.ray_address)
    assert result.returncode == 0, result.stderr
    assert "ingress-0" in result.stdout and "shard-0" in result.stdout
    result = small_router.cli("status", "--address", small_router.ray_address, "--json")
    status = json.loads(result.stdout)
    assert set(status["ingresses"]) == {"ingress-0"} and set(status["shards"]) == {"shard-0"}


def test_up_again_reports_the_running_router(small_router: Router):
    result = small_router.cli("up", "--address", small_router.ray_address)
    assert result.returncode == 0
    assert "already running" in result.stdout


def test_bad_configuration_is_named_at_start(small_router: Router):
    env = dict(small_router.env, PORT="not-a-port")
    result = small_router.cli_with(env, "up", "--address", small_router.ray_address)
    assert result.returncode == 2
    assert "PORT" in result.stderr


async def test_full_server_answers_503_with_retry_after(small_router: Router):
    clients = []
    try:
        for n in range(MAX_CONNECTIONS):
            clients.append(await small_router.person("observer", sub=f"full-{n}"))
        with pytest.raises(ConnectRejected) as info:
            await small_router.person("observer", sub="one-too-many")
        assert info.value.status == 503
        assert int(info.value.headers["Retry-After"]) > 0
    finally:
        for client in clients:
            await client.close()


async def test_dead_redis_degrades_health_but_telemetry_flows(small_router: Router):
    embedded = small_router.embedded_redis
    drone_key = small_router.cli("keys", "issue", "redis-outage").stdout.strip()
    pid = int(embedded.pidfile.read_text())
    os.kill(pid, signal.SIGKILL)
    try:

        async def degraded():
            status, _, body = await aget(f"{small_router.http}/health")
            return status == 503 and json.loads(body)["redis"] == "unreachable"

        await eventually(degraded, 20, "/health to report redis unreachable")
        # Drones still connect (revocations are cached) and QoS 0 telemetry still flows.
        station = await small_router.person("observer", sub="outage-station")
        await station.subscribe("drone/redis-outage/telemetry")
        drone = await Client.connect(small_router.url, api_key=drone_key)
        await drone.publish("drone/redis-outage/telemetry", {"during": "outage"})
        assert (await station.recv(timeout=10)).data == {"during": "outage"}
        for client in (drone, station):
            await client.close()
    finally:
        embedded.start()

    async def healthy():
        status, _, _ = await aget(f"{small_router.http}/health")
        return status == 200

    await eventually(healthy, 20, "/health to recover with redis")


def test_down_stops_the_router_and_its_redis(small_router: Router):
    embedded = small_router.embedded_redis
    assert embedded.running()
    result = small_router.cli("down", "--address", small_router.ray_address)
    assert result.returncode == 0, result.stderr
    assert not embedded.running()
    result = small_router.cli("status", "--address", small_router.ray_address)
    assert result.returncode == 1 and "no router running" in result.stderr
    assert not Path(small_router.env["STATE_DIR"], f"{small_router.namespace}.router.json").exists()
