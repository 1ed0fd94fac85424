"""End-to-end fixtures: one real redis-server, one real Ray cluster and one router per session.

The router is started the way an operator starts it, with ``sentientedge up --address ...``
against the session's Ray cluster, in a Ray namespace of its own; its actors, sockets and Redis
are all real. Tests talk to it over loopback WebSockets with ``sentientedge.client``.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import RedisServer, Router, pings, started_router
from tests.helpers import free_port, wait_until


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        pytest.fail("redis-server is not installed; scripts/setup installs it")
    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    server = RedisServer(url=f"redis://127.0.0.1:{port}/0", port=port, dir=data)
    server.process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
    )
    client = server.client()
    wait_until(lambda: pings(client), 20, "redis-server to answer")
    yield server
    server.process.terminate()
    server.process.wait(20)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    import ray

    # address="local": always a cluster of the tests' own, even when another Ray runs here.
    context = ray.init(
        address="local",
        num_cpus=16,  # logical: each router actor asks for ACTOR_CPUS (0.5)
        include_dashboard=False,
        log_to_driver=False,
        namespace="sentientedge-tests",
        # Loopback, as `sentientedge up` runs a local cluster: every test's traffic stays on
        # 127.0.0.1, the addresses the router reports (to a load balancer, say) included.
        _node_ip_address="127.0.0.1",
    )
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def router(
    ray_cluster: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Router]:
    """2 ingress and 4 shard actors."""
    with started_router(
        ray_cluster,
        redis_server,
        tmp_path_factory.mktemp("state"),
        ingresses=2,
        shards=4,
        # Short keepalive, so a drone that goes silent is noticed within seconds in the tests.
        PING_INTERVAL="1",
        PING_TIMEOUT="3",
        # Operators in the tests publish QoS 1 by the thousand, faster than 100 a minute.
        RATE_LIMIT_MAX="6000",
    ) as started:
        yield started
