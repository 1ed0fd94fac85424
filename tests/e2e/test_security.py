"""Credentials that end while connected, and tokens the router must not take (issue 10)."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest

from sentientedge import auth
from sentientedge.client import Client
from sentientedge.errors import ConnectRejected
from tests.e2e.support import API_KEY_SECRET, JWT_SECRET, Router

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
