"""End-to-end support: one real redis-server, one real Ray cluster and one router per test session.

The router is started the way an operator starts it, with ``sentientedge up --address ...``
against the session's Ray cluster, in a Ray namespace of its own; its actors, sockets and Redis
are all real. Tests talk to it over loopback WebSockets with ``sentientedge.client``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_lib

from sentientedge import auth, state
from sentientedge.client import Client, Message
from sentientedge.config import Config
from sentientedge.embedded_redis import EmbeddedRedis
from sentientedge.errors import ServerError
from tests.helpers import free_port

SENTIENTEDGE = str(Path(sys.executable).parent / "sentientedge")
JWT_SECRET = "test-jwt-secret-" + uuid.uuid4().hex
API_KEY_SECRET = "test-api-key-secret-" + uuid.uuid4().hex


async def next_on(client: Client, topic: str, timeout: float = 10.0) -> Any:
    """The next message on ``topic``, skipping others (presence, retained state of other topics)."""
    deadline = time.monotonic() + timeout
    while True:
        message = await client.recv(timeout=max(0.0, deadline - time.monotonic()))
        if message.topic == topic:
            return message


@dataclass
class RedisServer:
    url: str
    port: int
    dir: Path
    process: subprocess.Popen[bytes] | None = None

    def client(self) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(self.url, decode_responses=True)


def pings(client: redis_lib.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis_lib.RedisError:
        return False


@dataclass
class Router:
    """A running router and the means to reach it."""

    port: int
    namespace: str
    ray_address: str
    env: dict[str, str]
    redis: RedisServer
    jwt_secret: str = JWT_SECRET
    api_key_secret: str = API_KEY_SECRET
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api_key(self, drone_id: str) -> str:
        if drone_id not in self.keys:
            self.keys[drone_id] = auth.issue_api_key(self.api_key_secret, drone_id).key
        return self.keys[drone_id]

    def token(self, role: str, sub: str, ttl: float = 3600, **kwargs: Any) -> str:
        return auth.mint_jwt(self.jwt_secret, sub, role, ttl, **kwargs)

    def admin_token(self, sub: str = "root") -> str:
        """An admin token as POST /auth/token mints it: password and one-time code proven."""
        return self.token("admin", sub, amr=["pwd", "otp"])

    async def drone(self, drone_id: str, **kwargs: Any) -> Client:
        return await Client.connect(self.url, api_key=self.api_key(drone_id), **kwargs)

    async def person(self, role: str = "observer", sub: str | None = None, **kwargs: Any) -> Client:
        sub = sub or f"{role}-{uuid.uuid4().hex[:8]}"
        return await Client.connect(self.url, token=self.token(role, sub), **kwargs)

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return self.cli_with(self.env, *args, timeout=timeout)

    @property
    def embedded_redis(self) -> EmbeddedRedis:
        return EmbeddedRedis.for_config(Config.from_env(self.env))

    def cli_argv(self, *args: str) -> list[str]:
        return [SENTIENTEDGE, *args]

    def cli_with(
        self, env: dict[str, str], *args: str, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SENTIENTEDGE, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def router_env(
    redis_url: str, port: int, namespace: str, state_dir: Path, **extra: str
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PORT": str(port),
            "REDIS_URL": redis_url,
            "JWT_SECRET": JWT_SECRET,
            "API_KEY_SECRET": API_KEY_SECRET,
            "RAY_NAMESPACE": namespace,
            "STATE_DIR": str(state_dir),
            # A test router keeps the shape it was started with unless the test scales it.
            "AUTOSCALE": "false",
            # Every test connects from 127.0.0.1, many clients at once, some publishing fast:
            # the per-address and per-connection limits are tested with their own router.
            "HANDSHAKE_RATE": "100000",
            "MAX_BYTES_PER_S": "100000000",
            **extra,
        }
    )
    return env


@contextlib.contextmanager
def started_router(
    ray_address: str,
    redis_server: RedisServer,
    state_dir: Path,
    ingresses: int,
    shards: int,
    **settings: str,
) -> Iterator[Router]:
    """A router on the session's Ray and Redis, in a Ray namespace of its own, started and
    stopped with ``sentientedge up`` / ``down``."""
    port = free_port()
    namespace = f"se-test-{uuid.uuid4().hex[:6]}"
    env = router_env(redis_server.url, port, namespace, state_dir, **settings)
    started = Router(port, namespace, ray_address, env, redis_server)
    result = started.cli(
        "up", "--address", ray_address, "--ingress", str(ingresses), "--shards", str(shards)
    )
    assert result.returncode == 0, f"sentientedge up failed:\n{result.stdout}\n{result.stderr}"
    try:
        yield started
    finally:
        result = started.cli("down", "--address", ray_address)
        assert result.returncode == 0, result.stderr


async def collect(client: Client, count: int, prefix: str, timeout: float = 15) -> list[Any]:
    """The next ``count`` messages (not retained copies) on topics starting with ``prefix``."""
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        message = await client.recv(timeout=max(0.0, deadline - time.monotonic()))
        if message.topic.startswith(prefix) and not message.retained:
            out.append(message)
    return out


@contextlib.contextmanager
def embedded_router(
    ray_address: str, redis_server: RedisServer, state_dir: Path, **settings: str
) -> Iterator[Router]:
    """A router of 1 ingress and 1 shard with its own embedded Redis and generated secrets."""
    port = free_port()
    env = router_env("", port, f"se-own-{uuid.uuid4().hex[:6]}", state_dir, **settings)
    for name in ("REDIS_URL", "JWT_SECRET", "API_KEY_SECRET"):
        del env[name]  # the embedded default, and secrets generated into STATE_DIR/secrets.env
    env["EMBEDDED_REDIS_PORT"] = str(free_port())
    started = Router(port, env["RAY_NAMESPACE"], ray_address, env, redis_server)
    result = started.cli("up", "--address", ray_address, "--ingress", "1", "--shards", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedded" in result.stdout
    secrets = state.ensure_secrets(Config.from_env(env))
    assert secrets.jwt_secret and secrets.api_key_secret
    started.jwt_secret, started.api_key_secret = secrets.jwt_secret, secrets.api_key_secret
    try:
        yield started
    finally:
        started.cli("down", "--address", ray_address)


def http_get(url: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    return http_request(url, token=token)


def http_request(
    url: str, method: str = "GET", token: str | None = None, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def aget(url: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(http_get, url, token)


def status(router: Router) -> dict[str, Any]:
    result = router.cli("status", "--address", router.ray_address, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class QosLoad:
    """An operator publishing QoS 1 messages on several topics, retrying what is not acked
    (same id), and a station receiving them; both reconnect by themselves."""

    def __init__(self, router: Router, tag: str, topics: int = 6) -> None:
        self.router = router
        self.tag = tag
        self.prefix = f"fleet/{tag}"
        self.topics = [f"{self.prefix}/t{i}" for i in range(topics)]
        self.acked: set[int] = set()
        self.received: list[Message] = []
        self.unavailable = 0
        self.stop = asyncio.Event()

    async def start(self) -> None:
        self.station = await self.router.person("observer", sub=f"st-{self.tag}", reconnect=True)
        await self.station.subscribe(f"{self.prefix}/#")
        self.operator = await self.router.person("operator", sub=f"op-{self.tag}", reconnect=True)
        self.tasks = [
            asyncio.create_task(self._publish()),
            asyncio.create_task(self._receive()),
        ]

    async def _publish(self) -> None:
        n = 0
        while not self.stop.is_set():
            while True:
                try:
                    await self.operator.publish(
                        self.topics[n % len(self.topics)], {"n": n}, qos=1, id=f"m{n}", timeout=60
                    )
                    break
                except ServerError as exc:  # nothing stored: send the same id again
                    assert exc.code == "unavailable", exc
                    self.unavailable += 1
                    await asyncio.sleep(0.05)
            self.acked.add(n)
            n += 1
            await asyncio.sleep(0.005)

    async def _receive(self) -> None:
        while True:
            message = await self.station.recv()
            if message.topic.startswith(self.prefix) and not message.retained:
                self.received.append(message)

    async def acked_count_reaches(self, count: int, timeout: float) -> float:
        start = time.monotonic()
        target = len(self.acked) + count
        while len(self.acked) < target:
            assert time.monotonic() - start < timeout, "publishing did not resume in time"
            await asyncio.sleep(0.05)
        return time.monotonic() - start

    async def finish(self) -> None:
        self.stop.set()
        await self.tasks[0]
        deadline = time.monotonic() + 60
        while missing := self.acked - {m.data["n"] for m in self.received}:
            assert time.monotonic() < deadline, f"acked, never delivered: {sorted(missing)[:20]}"
            await asyncio.sleep(0.1)
        self.tasks[1].cancel()
        for client in (self.station, self.operator):
            await client.close()

    def check(self) -> None:
        per_topic: dict[str, list[int]] = collections.defaultdict(list)
        for message in self.received:
            per_topic[message.topic].append(message.data["n"])
        for topic, values in per_topic.items():
            assert values == sorted(values), f"{topic} out of order"
            assert len(values) == len(set(values)), f"{topic} delivered twice to the application"


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples named ``name`` in a Prometheus exposition: (labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def run_peer(module: str, timeout: float = 600) -> dict[str, Any]:
    """Run ``python -m module`` and return the JSON report on its last line. For tests with a
    Ray cluster of their own: this process already drives the session's."""
    result = subprocess.run(
        [sys.executable, "-m", module],
        cwd=Path(__file__).resolve().parent.parent.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))
