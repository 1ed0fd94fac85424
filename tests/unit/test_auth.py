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
VERIFIER = auth.Verifier(jwt_secrets=(SECRET,), api_key_secrets=(KEY_SECRET,))


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
    parts = key.key.split(".")
    other = auth.issue_api_key(KEY_SECRET, "drone-8").key.split(".")[1]
    with pytest.raises(AuthError, match="invalid"):
        auth.verify_api_key(KEY_SECRET, ".".join([parts[0], other, *parts[2:]]))
    expiring = auth.issue_api_key(KEY_SECRET, "drone-7", ttl_s=60).key.split(".")
    never_expiring = ".".join([*expiring[:3], "0", *expiring[4:]])  # expiry is signed too
    with pytest.raises(AuthError, match="invalid"):
        auth.verify_api_key(KEY_SECRET, never_expiring)
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
        auth.authenticate(Credentials(), VERIFIER)
    with pytest.raises(AuthError, match="not both"):
        auth.authenticate(Credentials(api_key="a", token="b"), VERIFIER)


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


def test_version_1_keys_still_verify():
    signature = auth._api_key_signature(KEY_SECRET, "drone-1\nabcdef0123456789")
    old = f"sek1.{auth._b64(b'drone-1')}.abcdef0123456789.{signature}"
    assert auth.verify_api_key(VERIFIER, old).key_id == "abcdef0123456789"


def test_api_key_with_a_ttl_expires():
    key = auth.issue_api_key(KEY_SECRET, "drone-1", ttl_s=60, now=1000.0)
    identity = auth.drone_identity(auth.verify_api_key(VERIFIER, key.key, now=1059.0))
    assert identity.expires_at == 1060.0 and identity.via_api_key
    with pytest.raises(AuthError, match="api key expired"):
        auth.verify_api_key(VERIFIER, key.key, now=1060.0)
    assert auth.verify_api_key(VERIFIER, auth.issue_api_key(KEY_SECRET, "d").key).expires_at is None


def test_rotation_accepts_old_and_new_secrets_until_the_old_one_is_retired():
    old, new = "o" * 32, "n" * 32
    old_token = auth.mint_jwt(old, "alice", "operator", 60)
    old_key = auth.issue_api_key(old, "drone-1").key
    rotating = auth.Verifier(jwt_secrets=(new, old), api_key_secrets=(new, old))
    assert auth.verify_jwt(old_token, rotating).subject == "alice"
    assert auth.verify_jwt(auth.mint_jwt(new, "bob", "operator", 60), rotating).subject == "bob"
    assert auth.verify_api_key(rotating, old_key).drone_id == "drone-1"
    retired = auth.Verifier(jwt_secrets=(new,), api_key_secrets=(new,))
    with pytest.raises(AuthError, match="key id unknown"):
        auth.verify_jwt(old_token, retired)
    with pytest.raises(AuthError, match="key id unknown"):
        auth.verify_api_key(retired, old_key)
    assert jwt.get_unverified_header(old_token)["kid"] == auth.secret_id(old)
    assert old not in old_token and auth.secret_id(old) != auth.secret_id(new)


def test_issuer_and_audience_are_pinned_when_set():
    pinned = auth.Verifier((SECRET,), (KEY_SECRET,), issuer="se-prod", audience="fleet")
    good = auth.mint_jwt(SECRET, "a", "observer", 60, issuer="se-prod", audience="fleet")
    assert auth.verify_jwt(good, pinned).subject == "a"
    for token, reason in (
        (auth.mint_jwt(SECRET, "a", "observer", 60, issuer="other", audience="fleet"), "issuer"),
        (auth.mint_jwt(SECRET, "a", "observer", 60, issuer="se-prod", audience="x"), "audience"),
        (auth.mint_jwt(SECRET, "a", "observer", 60), "lacks claim"),
    ):
        with pytest.raises(AuthError, match=reason):
            auth.verify_jwt(token, pinned)


def test_tokens_living_longer_than_jwt_max_ttl_are_refused():
    capped = auth.Verifier((SECRET,), (KEY_SECRET,), max_ttl_s=3600)
    assert auth.verify_jwt(auth.mint_jwt(SECRET, "a", "observer", 3600), capped)
    with pytest.raises(AuthError, match="JWT_MAX_TTL"):
        auth.verify_jwt(auth.mint_jwt(SECRET, "a", "observer", 3601), capped)
    year_9999 = jwt.encode({"sub": "a", "role": "admin", "exp": 253402300799}, SECRET, "HS256")
    with pytest.raises(AuthError, match="JWT_MAX_TTL"):
        auth.verify_jwt(year_9999, capped)


def test_second_factor_comes_from_the_amr_claim():
    with_otp = auth.mint_jwt(SECRET, "root", "admin", 60, amr=["pwd", "otp"])
    assert auth.verify_jwt(with_otp, SECRET).has_second_factor
    assert not auth.verify_jwt(auth.mint_jwt(SECRET, "root", "admin", 60), SECRET).has_second_factor
    with pytest.raises(AuthError, match="amr"):
        auth.verify_jwt(
            jwt.encode(
                {"sub": "a", "role": "admin", "exp": time.time() + 60, "amr": "otp"},
                SECRET,
                "HS256",
            ),
            SECRET,
        )
