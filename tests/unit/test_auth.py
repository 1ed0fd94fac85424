"""Credentials and permissions, without a server."""

from __future__ import annotations

import time

import jwt
import pytest

from sentientedge import auth
from sentientedge.auth import Credentials, Permissions, Role
from sentientedge.errors import AuthError

SECRET = "s" * 32
KEY_SECRET = "k" * 32


def test_jwt_round_trip():
    token = auth.mint_jwt(SECRET, "alice", "operator", 60)
    identity = auth.verify_jwt(token, SECRET)
    assert (identity.role, identity.subject, identity.principal) == (
        Role.OPERATOR,
        "alice",
        "user:alice",
    )


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: auth.mint_jwt(SECRET, "a", "operator", -10), "expired"),
        (lambda: auth.mint_jwt("x" * 32, "a", "operator", 60), "signature"),
        (lambda: "not.a.token", "malformed"),
        (lambda: jwt.encode({"sub": "a", "role": "operator"}, SECRET, "HS256"), "lacks claim exp"),
        (
            lambda: jwt.encode(
                {"sub": "a", "role": "pilot", "exp": time.time() + 60}, SECRET, "HS256"
            ),
            "role",
        ),
        (
            lambda: jwt.encode(
                {"sub": "a/b", "role": "admin", "exp": time.time() + 60}, SECRET, "HS256"
            ),
            "sub",
        ),
        (
            lambda: jwt.encode(
                {"sub": "a", "role": "admin", "exp": time.time() + 60}, SECRET, "HS512"
            ),
            "malformed",
        ),
    ],
)
def test_bad_jwts(make, reason):
    with pytest.raises(AuthError, match=reason):
        auth.verify_jwt(make(), SECRET)


def test_api_keys_verify_and_forgeries_do_not():
    key = auth.issue_api_key(KEY_SECRET, "drone-7")
    assert auth.verify_api_key(KEY_SECRET, key.key).drone_id == "drone-7"
    prefix, _, key_id, signature = key.key.split(".")
    other = auth.issue_api_key(KEY_SECRET, "drone-8").key.split(".")[1]
    with pytest.raises(AuthError, match="invalid"):
        auth.verify_api_key(KEY_SECRET, ".".join([prefix, other, key_id, signature]))
    with pytest.raises(AuthError, match="invalid"):
        auth.verify_api_key("z" * 32, key.key)
    with pytest.raises(AuthError, match="malformed"):
        auth.verify_api_key(KEY_SECRET, "hello")


def test_credentials_from_headers_and_query():
    assert Credentials.from_request({"Authorization": "Bearer t1"}, {}).token == "t1"
    assert Credentials.from_request({}, {"token": "t2"}).token == "t2"
    assert Credentials.from_request({"X-API-Key": "k1"}, {}).api_key == "k1"
    assert Credentials.from_request({}, {"api_key": "k2"}).api_key == "k2"
    with pytest.raises(AuthError):
        Credentials.from_request({"Authorization": "Basic abc"}, {})
    with pytest.raises(AuthError, match="no credentials"):
        auth.authenticate(Credentials(), SECRET, KEY_SECRET)
    with pytest.raises(AuthError, match="not both"):
        auth.authenticate(Credentials(api_key="a", token="b"), SECRET, KEY_SECRET)


def test_default_permissions_of_a_drone():
    perms = Permissions.for_role(Role.DRONE, "7")
    assert perms.can_publish("drone/7/telemetry")
    assert perms.can_publish("drone/7/cmd/result")
    assert not perms.can_publish("drone/7/cmd")
    assert not perms.can_publish("drone/8/telemetry")
    assert perms.can_subscribe("drone/7/cmd")
    assert perms.can_subscribe("fleet/#")
    assert not perms.can_subscribe("drone/8/cmd")
    assert not perms.can_subscribe("drone/+/cmd")


def test_default_permissions_of_people():
    observer = Permissions.for_role(Role.OBSERVER, "o")
    operator = Permissions.for_role(Role.OPERATOR, "p")
    admin = Permissions.for_role(Role.ADMIN, "a")
    assert observer.can_subscribe("drone/+/telemetry") and observer.can_subscribe("$sys/#")
    assert not observer.can_subscribe("#")
    assert not observer.can_publish("fleet/a")
    assert operator.can_publish("drone/7/cmd") and operator.can_publish("fleet/a/b")
    assert not operator.can_publish("drone/7/telemetry")
    assert admin.can_subscribe("#") and admin.can_publish("anything/at/all")
    assert not admin.can_publish("$sys/load")  # $ topics are the server's own


def test_acl_claim_narrows():
    token = auth.mint_jwt(
        SECRET, "p", "operator", 60, acl={"pub": ["drone/7/cmd"], "sub": ["drone/7/#"]}
    )
    perms = auth.verify_jwt(token, SECRET).permissions
    assert perms.can_publish("drone/7/cmd")
    assert not perms.can_publish("drone/8/cmd")
    assert perms.can_subscribe("drone/7/telemetry")
    assert not perms.can_subscribe("drone/+/telemetry")
    bad = auth.mint_jwt(SECRET, "p", "operator", 60, acl={"pub": ["a/#/b"]})
    with pytest.raises(AuthError, match="acl"):
        auth.verify_jwt(bad, SECRET)
