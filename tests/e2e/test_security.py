"""Credentials that end while connected, and tokens the router must not take (issue 10)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pyotp
import pytest

from sentientedge import auth, sealing, state
from sentientedge.client import Client
from sentientedge.config import Config
from sentientedge.errors import ConnectRejected, ServerError
from tests.e2e.support import (
    API_KEY_SECRET,
    JWT_SECRET,
    SENTIENTEDGE,
    RedisServer,
    Router,
    collect,
    embedded_router,
    http_request,
    next_on,
    started_router,
)
from tests.helpers import eventually

CREDENTIALS_ENDED = 4001


def _id() -> str:
    return uuid.uuid4().hex[:8]


async def test_a_jwt_expiring_while_connected_closes_the_connection_with_4001(router: Router):
    token = router.token("operator", f"brief-{_id()}", ttl=2)
    expires_at = jwt.decode(token, options={"verify_signature": False})["exp"]
    client = await Client.connect(router.url, token=token, reconnect=False)
    assert await client.wait_closed(timeout=10) == CREDENTIALS_ENDED
    # Closed after the expiry, and at most a few seconds late.
    assert expires_at <= time.time() <= expires_at + 4
    assert "expired" in client.close_reason


async def test_an_api_key_expiring_while_connected_closes_the_connection(router: Router):
    key = auth.issue_api_key(API_KEY_SECRET, f"lease-{_id()}", ttl_s=2).key
    drone = await Client.connect(router.url, api_key=key, reconnect=False)
    assert await drone.wait_closed(timeout=10) == CREDENTIALS_ENDED
    with pytest.raises(ConnectRejected) as info:
        await Client.connect(router.url, api_key=key)
    assert (info.value.status, info.value.body["reason"]) == (401, "api key expired")


async def test_a_key_revoked_while_connected_closes_its_connections_within_5_s(router: Router):
    drone_id = f"stolen-{_id()}"
    key = auth.issue_api_key(API_KEY_SECRET, drone_id).key
    connections = [await Client.connect(router.url, api_key=key, reconnect=False) for _ in range(2)]
    other = await router.drone(drone_id)  # another key of the same drone stays connected
    result = router.cli("keys", "revoke", key)
    assert result.returncode == 0, result.stderr
    revoked_at = time.monotonic()
    for conn in connections:
        assert await conn.wait_closed(timeout=10) == CREDENTIALS_ENDED
    assert time.monotonic() - revoked_at < 5
    assert "revoked" in connections[0].close_reason
    assert not other.closed
    await other.ping()
    await other.close()


async def test_a_token_revoked_by_jti_closes_its_connection_and_is_refused(router: Router):
    token = router.token("operator", f"leaver-{_id()}")
    client = await Client.connect(router.url, token=token, reconnect=False)
    result = router.cli("token", "revoke", token)
    assert result.returncode == 0, result.stderr
    assert token not in result.stdout + result.stderr
    assert await client.wait_closed(timeout=10) == CREDENTIALS_ENDED
    with pytest.raises(ConnectRejected) as info:
        await Client.connect(router.url, token=token)
    assert (info.value.status, info.value.body["reason"]) == (401, "token revoked")
    # Revoking by the bare jti works too.
    second = router.token("observer", f"leaver-{_id()}")
    jti = jwt.decode(second, options={"verify_signature": False})["jti"]
    assert router.cli("token", "revoke", jti).returncode == 0
    with pytest.raises(ConnectRejected):
        await Client.connect(router.url, token=second)


async def test_tokens_beyond_jwt_max_ttl_are_refused(router: Router):
    forever = jwt.encode(
        {"sub": "eve", "role": "admin", "exp": 253402300799, "iat": int(time.time())},
        JWT_SECRET,
        "HS256",
    )
    with pytest.raises(ConnectRejected) as info:
        await Client.connect(router.url, token=forever)
    assert info.value.status == 401 and "JWT_MAX_TTL" in info.value.body["reason"]
    result = router.cli("token", "--role", "observer", "--sub", "eve", "--ttl", "2d")
    assert result.returncode == 2 and "JWT_MAX_TTL" in result.stderr


def test_the_cli_mints_no_admin_token_while_mfa_is_required(router: Router):
    result = router.cli("token", "--role", "admin", "--sub", "root")
    assert result.returncode == 2 and "/auth/token" in result.stderr
    assert result.stdout == ""


async def test_dedupe_keys_of_two_drones_never_collide(router: Router):
    # Principal "drone:x" with id "y:evt-1" and principal "drone:x:y" with id "evt-1" once
    # built the same key: the second message was acknowledged and never stored.
    x = f"x{_id()}"
    station = await router.person("observer")
    await station.subscribe("drone/+/event")
    first = await router.drone(x)
    second = await router.drone(f"{x}:y")
    await first.publish(f"drone/{x}/event", {"from": "x"}, qos=1, id="y:evt-1")
    await second.publish(f"drone/{x}:y/event", {"from": "x:y"}, qos=1, id="evt-1")
    got = {(await station.recv(timeout=10)).data["from"] for _ in range(2)}
    assert got == {"x", "x:y"}
    for client in (station, first, second):
        await client.close()


# Bounds per identity, on a router of their own with small limits.


@pytest.fixture(scope="module")
def bounded(
    ray_cluster: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Router]:
    with started_router(
        ray_cluster,
        redis_server,
        tmp_path_factory.mktemp("bounded"),
        ingresses=1,
        shards=1,
        HANDSHAKE_RATE="4",  # a burst of 20
        TRUSTED_PROXIES="127.0.0.1",  # as if behind a load balancer on this machine
        MAX_SUBSCRIPTIONS="5",
        MAX_RETAINED_PER_DRONE="4",
        SESSION_QUEUE_MAX="50",
        MAX_COMMANDS_PER_DRONE="20",
        MAX_BYTES_PER_S="20000",
        RATE_LIMIT_MAX="60000",
    ) as router:
        yield router


def _cluster_status(router: Router) -> dict[str, Any]:
    code, _, body = http_request(f"{router.http}/admin/cluster-status", token=router.admin_token())
    assert code == 200, body
    return json.loads(body)


async def test_subscriptions_per_connection_are_bounded(bounded: Router):
    client = await bounded.person("observer")
    assert await client.subscribe(*(f"fleet/f{n}/#" for n in range(4))) == [
        f"fleet/f{n}/#" for n in range(4)
    ]
    await client.subscribe("fleet/f0/#", "fleet/f4/#")  # one already held: 5 in all
    with pytest.raises(ServerError) as info:
        await client.subscribe("fleet/f5/#")
    assert info.value.code == "forbidden" and "MAX_SUBSCRIPTIONS" in str(info.value)
    await client.unsubscribe("fleet/f4/#")
    await client.subscribe("fleet/f5/#")  # room again
    await client.close()


async def test_retained_topics_per_drone_are_bounded(bounded: Router, redis_server: RedisServer):
    drone_id = f"hoarder-{_id()}"
    station = await bounded.person("observer")
    await station.subscribe(f"drone/{drone_id}/status")
    drone = await bounded.drone(drone_id)
    assert (await next_on(station, f"drone/{drone_id}/status")).data["online"]
    # The retained status is one of the drone's 4 topics: 3 more are kept, then no more.
    for n in range(3):
        await drone.publish(f"drone/{drone_id}/t{n}", n, qos=1, retain=True, id=f"r{n}")
    for n in range(3, 40):
        with pytest.raises(ServerError) as info:
            await drone.publish(f"drone/{drone_id}/t{n}", n, qos=1, retain=True, id=f"r{n}")
        assert info.value.code == "forbidden" and "MAX_RETAINED_PER_DRONE" in str(info.value)
    await drone.publish(f"drone/{drone_id}/t0", "again", qos=1, retain=True, id="r0-2")
    for n in range(40, 80):  # QoS 0 past the limit is delivered, not kept
        await drone.publish(f"drone/{drone_id}/t{n}", n, retain=True)
    await drone.ping()
    late = await bounded.person("observer")
    await late.subscribe(f"drone/{drone_id}/#")
    retained = set()
    while (message := late.recv_nowait()) is not None or not retained:
        if message is None:
            message = await late.recv(timeout=10)
        retained.add(message.topic)
    stored = {
        key
        for key in redis_server.client().hkeys(f"{bounded.namespace}:retained")
        if key.startswith(f"drone/{drone_id}/")
    }
    expected = {f"drone/{drone_id}/status"} | {f"drone/{drone_id}/t{n}" for n in range(3)}
    assert stored == expected
    assert retained <= expected
    for client in (station, drone, late):
        await client.close()


async def test_session_and_command_queues_are_bounded(bounded: Router, redis_server: RedisServer):
    fleet, drone_id = f"q{_id()}", f"offline-{_id()}"
    token = bounded.token("observer", f"slow-{_id()}")
    away = await Client.connect(bounded.url, token=token, auto_ack=False)
    await away.subscribe(f"fleet/{fleet}/event")
    session = away.session
    await away.close()
    operator = await bounded.person("operator")
    for n in range(120):
        await operator.publish(f"fleet/{fleet}/event", n, qos=1, id=f"e{n}")
    for n in range(30):
        await operator.publish(f"drone/{drone_id}/cmd", {"n": n}, qos=1, id=f"c{n}")
    await operator.close()
    redis = redis_server.client()
    assert redis.xlen(f"{bounded.namespace}:sq:{session}") == 50
    assert redis.xlen(f"{bounded.namespace}:dq:{drone_id}") == 20
    # The session resumes with the newest 50; the drone gets its newest 20 commands.
    back = await Client.connect(bounded.url, token=token, session=session)
    assert back.welcome.resumed
    got = [(await next_on(back, f"fleet/{fleet}/event")).data for _ in range(50)]
    assert got == list(range(70, 120))
    await back.close()
    drone = await bounded.drone(drone_id)
    await drone.subscribe(f"drone/{drone_id}/cmd")
    commands = [(await next_on(drone, f"drone/{drone_id}/cmd")).data["n"] for _ in range(20)]
    assert commands == list(range(10, 30))
    await drone.close()


async def test_bytes_per_second_per_connection_are_bounded(bounded: Router):
    drone_id = f"bulky-{_id()}"
    drone = await bounded.drone(drone_id)
    blob = "x" * 10_000
    for n in range(12):  # 120 KB at once: 3 times the burst of MAX_BYTES_PER_S
        await drone.publish(f"drone/{drone_id}/event", {"n": n, "blob": blob})
    error = await drone.next_error(timeout=10)
    assert error["code"] == "rate_limited" and "bytes" in error["msg"]
    await drone.ping()  # still connected
    await drone.close()


async def test_connections_that_never_subscribe_leave_no_session_at_the_shards(bounded: Router):
    def sessions() -> int:
        return int(_cluster_status(bounded)["sessions"])

    before = sessions()
    ids = [f"pub-{_id()}" for _ in range(3)]
    publishers = [await bounded.drone(drone_id) for drone_id in ids]
    for drone_id, drone in zip(ids, publishers, strict=True):
        await drone.publish(f"drone/{drone_id}/telemetry", {"alt": 1})
    subscriber = await bounded.person("observer")
    await subscriber.subscribe("fleet/anything")
    await eventually(lambda: sessions() == before + 4, 10, "4 open sessions")
    for client in (*publishers, subscriber):
        await client.close()
    # The subscriber's session is kept for its resume; the publishers' leave nothing.
    await eventually(lambda: sessions() == before + 1, 10, "only the subscriber's session")


async def test_a_handshake_flood_from_one_address_gets_429(bounded: Router):
    token = bounded.token("observer", "flood")
    opened, refused = [], []
    for n in range(40):
        # A subject each: the address's handshake rate is what refuses, not the per-user limit
        # of connections (10), which a quick enough router reached first.
        try:
            opened.append(
                await Client.connect(bounded.url, token=bounded.token("observer", f"flood-{n}"))
            )
        except ConnectRejected as exc:
            refused.append(exc)
    assert refused and len(opened) <= 21
    assert all(exc.status == 429 for exc in refused)
    assert refused[0].body["error"] == "too_many_handshakes"
    retry_after = float(refused[0].headers["Retry-After"])
    for client in opened:
        await client.close()

    async def admitted() -> bool:
        try:
            client = await Client.connect(bounded.url, token=token)
        except ConnectRejected:
            return False
        await client.close()
        return True

    await eventually(admitted, retry_after + 5, "a handshake after Retry-After")


async def test_behind_a_trusted_balancer_each_forwarded_client_is_counted_apart(
    bounded: Router,
):
    token = bounded.token("observer", "behind-lb")

    async def handshake(client_address: str) -> int:
        try:
            client = await Client.connect(
                bounded.url, token=token, headers={"X-Forwarded-For": client_address}
            )
        except ConnectRejected as exc:
            return exc.status
        await client.close()
        return 101

    # Thirty clients behind the balancer: each has a bucket of its own.
    assert [await handshake(f"198.51.100.{n}") for n in range(30)] == [101] * 30
    # One of them in a reconnect loop is refused past its burst (20), the others are not.
    codes = [await handshake("198.51.100.250") for _ in range(30)]
    assert codes[:20] == [101] * 20 and 429 in codes[20:]
    assert await handshake("198.51.100.1") == 101


# Admins: password and one-time code, then a short admin token.


def _enrol(router: Router, name: str, password: str) -> pyotp.TOTP:
    result = subprocess.run(
        [SENTIENTEDGE, "admin", "add", name, "--password-stdin"],
        input=password + "\n",
        env=router.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    uri = next(line for line in result.stdout.splitlines() if line.startswith("otpauth://"))
    assert "█" in result.stdout or "▀" in result.stdout  # the QR code
    totp = pyotp.parse_uri(uri)
    assert isinstance(totp, pyotp.TOTP)
    return totp


def _login(router: Router, body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
    code, headers, raw = http_request(
        f"{router.http}/auth/token", "POST", body=json.dumps(body).encode()
    )
    return code, headers, json.loads(raw)


def test_an_admin_logs_in_with_password_and_code_and_a_code_works_once(router: Router):
    name, password = f"ops-{_id()}", "correct horse battery staple"
    totp = _enrol(router, name, password)
    otp = totp.now()
    code, _, answer = _login(router, {"user": name, "password": password, "otp": otp})
    assert code == 200, answer
    claims = jwt.decode(answer["token"], options={"verify_signature": False})
    assert (claims["sub"], claims["role"], claims["amr"]) == (name, "admin", ["pwd", "otp"])
    assert claims["exp"] - claims["iat"] == answer["expires_in"] <= 900
    status_code, _, _ = http_request(f"{router.http}/admin/cluster-status", token=answer["token"])
    assert status_code == 200
    # The same code again (replayed): refused, and the answer does not say which factor.
    code, _, answer = _login(router, {"user": name, "password": password, "otp": otp})
    assert (code, answer["reason"]) == (401, "bad credentials")
    wrong = f"{(int(totp.now()) + 1) % 1_000_000:06d}"
    code, _, answer = _login(router, {"user": name, "password": password, "otp": wrong})
    assert (code, answer["reason"]) == (401, "bad credentials")
    code, _, answer = _login(router, {"user": name, "password": "guess", "otp": totp.now()})
    assert code == 401
    code, _, answer = _login(router, {"user": name, "password": password})
    assert code == 400 and "otp" in answer["reason"]


def test_failed_logins_are_throttled_per_name_across_the_router(router: Router):
    name, password = f"target-{_id()}", "another long passphrase"
    totp = _enrol(router, name, password)
    codes = []
    for _ in range(8):  # the two ingresses share the port, and the count (in Redis)
        code, headers, _ = _login(router, {"user": name, "password": "wrong!", "otp": "000000"})
        codes.append(code)
        if code == 429:
            assert int(headers["Retry-After"]) > 0
    assert codes == [401] * 5 + [429] * 3
    del totp


async def test_the_audit_log_holds_each_security_event(router: Router):
    drone_id = f"audited-{_id()}"
    key = router.cli("keys", "issue", drone_id).stdout.strip()
    router.cli("keys", "revoke", key)
    token = router.cli("token", "--role", "observer", "--sub", "auditor").stdout.strip()
    router.cli("token", "revoke", token)
    with pytest.raises(ConnectRejected):
        await Client.connect(router.url, api_key=key)
    code, _, _ = _login(router, {"user": "nobody", "password": "x" * 12, "otp": "123456"})
    assert code == 401
    http_request(f"{router.http}/admin/cluster-status", token=router.token("operator", "op"))
    path = Path(router.env["STATE_DIR"]) / "audit.log"

    def events() -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines()]

    wanted = {
        "key_issued",
        "key_revoked",
        "token_minted",
        "token_revoked",
        "handshake_refused",
        "login",
        "admin_request",
    }
    await eventually(lambda: wanted <= {e["event"] for e in events()}, 10, "the audit lines")
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert key not in text and token not in text and "x" * 12 not in text
    lines = events()
    assert any(e["event"] == "login" and e.get("detail") == "unknown_admin" for e in lines)
    assert any(
        e["event"] == "admin_request" and e["outcome"] == "forbidden" and e.get("sub") == "op"
        for e in lines
    )
    assert any(
        e["event"] == "handshake_refused"
        and e["reason"] == "api key revoked"
        and e["address"] == "127.0.0.1"
        for e in lines
    )


# Encryption at rest: nothing a client sent is readable in Redis's files.


@pytest.fixture(scope="module")
def sealed(
    ray_cluster: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Router]:
    with started_router(
        ray_cluster,
        redis_server,
        tmp_path_factory.mktemp("sealed"),
        ingresses=1,
        shards=1,
        ENCRYPTION_KEY=sealing.generate_key(),
    ) as router:
        yield router


def _aof(redis_server: RedisServer) -> bytes:
    return b"".join(p.read_bytes() for p in Path(redis_server.dir).rglob("*.aof*"))


async def test_with_encryption_key_redis_holds_no_plaintext_payload(
    sealed: Router, router: Router, redis_server: RedisServer
):
    secret_marker, plain_marker = f"lat-{_id()}-sealed", f"lat-{_id()}-plain"
    drone_id = f"sealed-{_id()}"
    away_token = sealed.token("observer", f"queue-{_id()}")
    away = await Client.connect(sealed.url, token=away_token)
    await away.subscribe(f"drone/{drone_id}/event")
    session = away.session
    await away.close()
    drone = await sealed.drone(drone_id)
    await drone.publish(f"drone/{drone_id}/event", {"m": secret_marker}, qos=1, id="e1")
    await drone.publish(f"drone/{drone_id}/state", {"m": secret_marker}, qos=1, retain=True, id="r")
    await drone.publish(f"drone/{drone_id}/telemetry", {"m": secret_marker})
    control = await router.drone(drone_id)  # the same on a router without ENCRYPTION_KEY
    await control.publish(f"drone/{drone_id}/event", {"m": plain_marker}, qos=1, id="e1")
    redis = redis_server.client()
    await eventually(
        lambda: redis.exists(f"{sealed.namespace}:drone:{drone_id}"), 10, "the last telemetry"
    )
    await eventually(lambda: plain_marker.encode() in _aof(redis_server), 10, "the control")
    assert secret_marker.encode() not in _aof(redis_server)
    # Clients read it all in the clear: the queued message on resume, the retained message.
    back = await Client.connect(sealed.url, token=away_token, session=session)
    message = await next_on(back, f"drone/{drone_id}/event")
    assert (message.data, message.dup) == ({"m": secret_marker}, True)
    late = await sealed.person("observer")
    await late.subscribe(f"drone/{drone_id}/state", f"drone/{drone_id}/telemetry")
    got = {(await late.recv(timeout=10)).topic: None for _ in range(2)}
    assert set(got) == {f"drone/{drone_id}/state", f"drone/{drone_id}/telemetry"}
    for client in (drone, control, back, late):
        await client.close()


def test_a_bad_encryption_key_is_a_start_up_error_that_does_not_echo_it(router: Router):
    env = dict(router.env, ENCRYPTION_KEY="c2hvcnQta2V5")
    result = router.cli_with(env, "status")
    assert result.returncode == 2 and "ENCRYPTION_KEY" in result.stderr
    assert "c2hvcnQta2V5" not in result.stderr


# Rotating the secrets while the router serves.


async def test_secrets_rotate_without_downtime_then_retire(
    ray_cluster: str, redis_server: RedisServer, tmp_path: Path
):
    with embedded_router(ray_cluster, redis_server, tmp_path / "state") as router:
        old_token = router.token("observer", "station")
        old_key = router.api_key("rotor-1")
        station = await Client.connect(router.url, token=old_token, reconnect=True)
        await station.subscribe("drone/rotor-1/event")
        drone = await Client.connect(router.url, api_key=old_key, reconnect=True)
        result = router.cli("secrets", "rotate", "--address", ray_cluster)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "replaced" in result.stdout or "->" in result.stdout
        # Both resumed on the new ingress with their old credentials, and messages flow
        # (the new ingress reaches the old shard: the stream key did not change).
        await drone.publish("drone/rotor-1/event", {"n": 1}, qos=1, id="after-rotate")
        assert (await next_on(station, "drone/rotor-1/event")).data == {"n": 1}
        rotated = state.ensure_secrets(Config.from_env(router.env))
        assert rotated.jwt_secret != router.jwt_secret
        assert rotated.jwt_previous_secret == router.jwt_secret
        new_token = auth.mint_jwt(rotated.jwt_secret, "fresh", "observer", 600)
        for token in (old_token, new_token):
            client = await Client.connect(router.url, token=token)
            await client.close()
        result = router.cli("secrets", "retire", "--address", ray_cluster)
        assert result.returncode == 0, result.stdout + result.stderr
        with pytest.raises(ConnectRejected) as info:
            await Client.connect(router.url, token=old_token)
        assert info.value.status == 401 and "key id unknown" in info.value.body["reason"]
        with pytest.raises(ConnectRejected):
            await Client.connect(router.url, api_key=old_key)
        client = await Client.connect(router.url, token=new_token)
        await client.close()
        await station.close()
        await drone.close()


async def test_a_resume_with_narrower_rights_drops_what_it_may_no_longer_read(router: Router):
    fleet, sub = f"narrow{_id()}", f"narrowed-{_id()}"
    broad = router.token("observer", sub)
    client = await Client.connect(router.url, token=broad, auto_ack=False)
    await client.subscribe(f"fleet/{fleet}/secret", f"fleet/{fleet}/open")
    session = client.session
    await client.close()
    operator = await router.person("operator")
    for n in range(5):
        await operator.publish(f"fleet/{fleet}/secret", n, qos=1, id=f"s{n}")
        await operator.publish(f"fleet/{fleet}/open", n, qos=1, id=f"o{n}")
    # The same subject comes back with a token narrowed to the open topic only.
    narrow = router.token("observer", sub, acl={"sub": [f"fleet/{fleet}/open"]})
    back = await Client.connect(router.url, token=narrow, session=session)
    assert back.welcome.resumed
    await operator.publish(f"fleet/{fleet}/open", 99, qos=1, id="after")
    # In seq order: the five queued open ones (the secret ones between them passed over), then
    # the new one. Anything of the secret topic would have come before it.
    got = [await back.recv(timeout=10) for _ in range(6)]
    expected = [(f"fleet/{fleet}/open", n) for n in (0, 1, 2, 3, 4, 99)]
    assert [(m.topic, m.data) for m in got] == expected
    await back.close()
    await operator.close()


async def test_a_full_redis_answers_unavailable_and_loses_nothing_acknowledged(
    router: Router, redis_server: RedisServer
):
    fleet = f"oom{_id()}"
    token = router.token("observer", f"oom-{_id()}")
    reader = await Client.connect(router.url, token=token, auto_ack=False)
    await reader.subscribe(f"fleet/{fleet}/log")
    operator = await router.person("operator")
    redis = redis_server.client()
    used = int(redis.info("memory")["used_memory"])
    redis.config_set("maxmemory", used + 2_000_000)  # noeviction is redis-server's default
    acked: list[int] = []
    refused = None
    try:
        for n in range(5000):
            try:
                await operator.publish(f"fleet/{fleet}/log", {"n": n, "pad": "x" * 2000}, qos=1)
            except ServerError as exc:
                refused = exc
                break
            acked.append(n)
    finally:
        redis.config_set("maxmemory", 0)
    assert refused is not None and refused.code == "unavailable"
    assert len(acked) > 10
    got = [m.data["n"] for m in await collect(reader, len(acked), f"fleet/{fleet}/")]
    assert got == acked
    await operator.publish(f"fleet/{fleet}/log", {"n": -1}, qos=1)  # writable again
    await reader.close()
    await operator.close()


async def test_end_to_end_sealed_data_crosses_the_router_unread(router: Router):
    fleet_key = f"fleet-{_id()}:{sealing.generate_key()}"
    topic = f"fleet/e2e{_id()}/orders"
    operator = await Client.connect(
        router.url, token=router.token("operator", "e2e-op"), fleet_key=fleet_key
    )
    keyholder = await Client.connect(
        router.url, token=router.token("observer", "e2e-in"), fleet_key=fleet_key
    )
    outsider = await router.person("observer")  # no key: sees what the router sees
    for client in (keyholder, outsider):
        await client.subscribe(topic)
    order = {"goto": [52.1, 4.3], "alt": 120}
    await operator.publish(topic, order, qos=1, id="o1")
    opened = await next_on(keyholder, topic)
    assert (opened.data, opened.sealed, opened.qos) == (order, True, 1)
    envelope = (await next_on(outsider, topic)).data
    assert envelope["e2e"] == "se1-aesgcm" and "52.1" not in json.dumps(envelope)
    for client in (operator, keyholder, outsider):
        await client.close()
