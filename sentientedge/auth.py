"""Identities, credentials and permissions (PROTOCOL.md, "Identity" and "Topics").

Rules for this module:
- Secrets are compared with ``hmac.compare_digest``; nothing here logs a credential.
- Every failure raises :class:`AuthError` with a short reason that the handshake sends back
  in its 401 body; it never says more than a client needs to fix its request.
- Revocation lives in Redis (sentientedge.store); this module only parses and verifies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any

import jwt

from sentientedge.errors import AuthError, BadTopic
from sentientedge.topics import covers, is_server_topic, matches, validate_filter, validate_topic

JWT_ALGORITHM = "HS256"
API_KEY_PREFIX = "sek1"


class Role(str, Enum):
    DRONE = "drone"
    OBSERVER = "observer"
    OPERATOR = "operator"
    ADMIN = "admin"


@dataclass(frozen=True)
class Permissions:
    """What an identity may publish and subscribe to, as filters.

    ``acl_pub`` / ``acl_sub`` narrow the role's rights (a JWT ``acl`` claim); ``None`` means
    no narrowing. Topics starting with ``$`` are the server's own: nobody publishes there.
    """

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    everything: bool = False
    acl_pub: tuple[str, ...] | None = None
    acl_sub: tuple[str, ...] | None = None

    def can_publish(self, topic: str) -> bool:
        return _can_publish(self, topic)

    def can_subscribe(self, topic_filter: str) -> bool:
        return _can_subscribe(self, topic_filter)

    @classmethod
    def for_role(
        cls, role: Role, subject: str, acl: Mapping[str, Any] | None = None
    ) -> Permissions:
        acl_pub = _acl_list(acl, "pub")
        acl_sub = _acl_list(acl, "sub")
        if role is Role.DRONE:
            base = cls(
                publish=(f"drone/{subject}/#",),
                publish_deny=(f"drone/{subject}/cmd",),
                subscribe=(f"drone/{subject}/cmd", "fleet/#"),
            )
        elif role is Role.OBSERVER:
            base = cls(publish=(), subscribe=("drone/#", "fleet/#", "$sys/#"))
        elif role is Role.OPERATOR:
            base = cls(
                publish=("drone/+/cmd", "fleet/#"), subscribe=("drone/#", "fleet/#", "$sys/#")
            )
        else:
            base = cls(publish=("#",), subscribe=("#", "$sys/#"), everything=True)
        return cls(
            publish=base.publish,
            subscribe=base.subscribe,
            publish_deny=base.publish_deny,
            everything=base.everything,
            acl_pub=acl_pub,
            acl_sub=acl_sub,
        )


def _acl_list(acl: Mapping[str, Any] | None, key: str) -> tuple[str, ...] | None:
    if acl is None or key not in acl:
        return None
    value = acl[key]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AuthError(f"acl claim: {key} must be a list of topic filters")
    try:
        for item in value:
            validate_filter(item)
    except BadTopic as exc:
        raise AuthError(f"acl claim: {exc}") from None
    return tuple(value)


@lru_cache(maxsize=65_536)
def _can_publish(perms: Permissions, topic: str) -> bool:
    validate_topic(topic)
    if is_server_topic(topic):
        return False
    if perms.acl_pub is not None and not any(matches(p, topic) for p in perms.acl_pub):
        return False
    if perms.everything:
        return True
    if any(matches(p, topic) for p in perms.publish_deny):
        return False
    return any(matches(p, topic) for p in perms.publish)


@lru_cache(maxsize=65_536)
def _can_subscribe(perms: Permissions, topic_filter: str) -> bool:
    validate_filter(topic_filter)
    if perms.acl_sub is not None and not any(covers(p, topic_filter) for p in perms.acl_sub):
        return False
    if perms.everything:
        return True
    return any(covers(p, topic_filter) for p in perms.subscribe)


@dataclass(frozen=True)
class Identity:
    role: Role
    subject: str
    permissions: Permissions
    credential_id: str | None = None
    expires_at: float | None = None

    @property
    def is_drone(self) -> bool:
        return self.role is Role.DRONE

    @property
    def principal(self) -> str:
        """Key for per-identity limits: drones and people are counted apart."""
        return f"{'drone' if self.is_drone else 'user'}:{self.subject}"


def _check_subject(subject: object, what: str) -> str:
    if not isinstance(subject, str) or not subject:
        raise AuthError(f"{what} must be a non-empty string")
    try:
        # A subject becomes a topic level (drone/{id}/...), so it must be one.
        validate_topic(subject)
    except BadTopic:
        raise AuthError(f"{what} must be 1-64 characters of [A-Za-z0-9_.:-]") from None
    if "/" in subject or subject.startswith("$"):
        raise AuthError(f"{what} must not contain '/' or start with '$'")
    return subject


# JWT


def mint_jwt(
    secret: str,
    subject: str,
    role: Role | str,
    ttl_s: float,
    *,
    acl: Mapping[str, list[str]] | None = None,
    now: float | None = None,
) -> str:
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {
        "sub": subject,
        "role": Role(role).value,
        "iat": int(issued),
        "exp": int(issued + ttl_s),
        "jti": secrets.token_hex(8),
    }
    if acl is not None:
        claims["acl"] = dict(acl)
    return jwt.encode(claims, secret, algorithm=JWT_ALGORITHM)


def verify_jwt(token: str, secret: str, *, now: float | None = None) -> Identity:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[JWT_ALGORITHM],
            options={"require": ["exp", "sub"], "verify_sub": False},
            leeway=0,
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError("token signature invalid") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(f"token lacks claim {exc.claim}") from None
    except jwt.InvalidTokenError:
        raise AuthError("token malformed") from None
    if now is not None and claims["exp"] <= now:
        raise AuthError("token expired")
    try:
        role = Role(claims.get("role"))
    except ValueError:
        raise AuthError("token role must be one of drone, observer, operator, admin") from None
    subject = _check_subject(claims["sub"], "token sub")
    acl = claims.get("acl")
    if acl is not None and not isinstance(acl, dict):
        raise AuthError("acl claim must be a map")
    return Identity(
        role=role,
        subject=subject,
        permissions=Permissions.for_role(role, subject, acl),
        credential_id=claims.get("jti"),
        expires_at=float(claims["exp"]),
    )


# API keys: sek1.<base64url drone id>.<key id>.<base64url HMAC-SHA256 of both>


@dataclass(frozen=True)
class ApiKey:
    key: str
    key_id: str
    drone_id: str


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _api_key_signature(secret: str, drone_id: str, key_id: str) -> str:
    mac = hmac.new(secret.encode(), f"{drone_id}\n{key_id}".encode(), hashlib.sha256)
    return _b64(mac.digest())


def issue_api_key(secret: str, drone_id: str) -> ApiKey:
    drone_id = _check_subject(drone_id, "drone id")
    key_id = secrets.token_hex(8)
    signature = _api_key_signature(secret, drone_id, key_id)
    key = f"{API_KEY_PREFIX}.{_b64(drone_id.encode())}.{key_id}.{signature}"
    return ApiKey(key=key, key_id=key_id, drone_id=drone_id)


def parse_api_key(key: str) -> tuple[str, str, str]:
    """Split a key into (drone id, key id, signature) without verifying it."""
    parts = key.split(".")
    if len(parts) != 4 or parts[0] != API_KEY_PREFIX:
        raise AuthError("api key malformed")
    try:
        drone_id = _unb64(parts[1]).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise AuthError("api key malformed") from None
    return drone_id, parts[2], parts[3]


def verify_api_key(secret: str, key: str) -> ApiKey:
    drone_id, key_id, signature = parse_api_key(key)
    expected = _api_key_signature(secret, drone_id, key_id)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise AuthError("api key invalid")
    return ApiKey(key=key, key_id=key_id, drone_id=_check_subject(drone_id, "drone id"))


def drone_identity(api_key: ApiKey) -> Identity:
    return Identity(
        role=Role.DRONE,
        subject=api_key.drone_id,
        permissions=Permissions.for_role(Role.DRONE, api_key.drone_id),
        credential_id=api_key.key_id,
    )


@dataclass(frozen=True)
class Credentials:
    """What a handshake presented, pulled from headers and query string."""

    api_key: str | None = None
    token: str | None = None

    @classmethod
    def from_request(cls, headers: Mapping[str, str], query: Mapping[str, str]) -> Credentials:
        try:
            api_key = headers.get("X-API-Key") or query.get("api_key")
            authorization = headers.get("Authorization")
        except LookupError:  # websockets' MultipleValuesError: the header was sent twice
            raise AuthError("a credential header was sent more than once") from None
        token = query.get("token")
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise AuthError("authorization header must be 'Bearer <token>'")
            token = value.strip()
        return cls(api_key=api_key or None, token=token or None)


def authenticate(credentials: Credentials, jwt_secret: str, api_key_secret: str) -> Identity:
    """Verify what a handshake presented; revocation is checked by the caller."""
    if credentials.api_key and credentials.token:
        raise AuthError("present either an api key or a token, not both")
    if credentials.token:
        return verify_jwt(credentials.token, jwt_secret)
    if credentials.api_key:
        return drone_identity(verify_api_key(api_key_secret, credentials.api_key))
    raise AuthError("no credentials: send X-API-Key or Authorization: Bearer")
