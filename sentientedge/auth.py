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
API_KEY_PREFIX_V2 = "sek2"


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


@dataclass(frozen=True, slots=True)  # one per connection: no __dict__ (300 bytes) each
class Identity:
    role: Role
    subject: str
    permissions: Permissions
    credential_id: str | None = None  # the token's jti or the API key's id: what revokes it
    expires_at: float | None = None  # Unix seconds; the connection closes with 4001 then
    via_api_key: bool = False
    amr: tuple[str, ...] = ()  # how the subject proved itself (RFC 8176): "pwd", "otp"

    @property
    def is_drone(self) -> bool:
        return self.role is Role.DRONE

    @property
    def principal(self) -> str:
        """Key for per-identity limits: drones and people are counted apart."""
        return f"{'drone' if self.is_drone else 'user'}:{self.subject}"

    @property
    def has_second_factor(self) -> bool:
        return "otp" in self.amr


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


def secret_id(secret: str) -> str:
    """A secret's key id (``kid``): names it in tokens and keys without revealing it."""
    return hashlib.sha256(b"sentientedge-kid\n" + secret.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Verifier:
    """What checks credentials: the secrets in force (current first, then those being
    retired), the pinned issuer and audience, the longest lifetime a token may claim."""

    jwt_secrets: tuple[str, ...]
    api_key_secrets: tuple[str, ...]
    issuer: str | None = None
    audience: str | None = None
    max_ttl_s: float = 86_400.0

    @classmethod
    def of(cls, secret: Verifier | str) -> Verifier:
        """A bare secret (tests, tools) is a verifier with that one secret for both."""
        if isinstance(secret, Verifier):
            return secret
        return cls(jwt_secrets=(secret,), api_key_secrets=(secret,))

    def jwt_secret_for(self, kid: object) -> str:
        if kid is None:  # tokens minted before key ids: only the current secret
            return self.jwt_secrets[0]
        for secret in self.jwt_secrets:
            if kid == secret_id(secret):
                return secret
        raise AuthError("token signature invalid: key id unknown (secret rotated out?)")

    def api_key_secret_for(self, kid: str | None) -> tuple[str, ...]:
        if kid is None:
            return self.api_key_secrets
        for secret in self.api_key_secrets:
            if kid == secret_id(secret):
                return (secret,)
        raise AuthError("api key invalid: key id unknown (secret rotated out?)")


# JWT


def mint_jwt(
    secret: str,
    subject: str,
    role: Role | str,
    ttl_s: float,
    *,
    acl: Mapping[str, list[str]] | None = None,
    amr: list[str] | None = None,
    issuer: str | None = None,
    audience: str | None = None,
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
    if amr is not None:
        claims["amr"] = list(amr)
    if issuer is not None:
        claims["iss"] = issuer
    if audience is not None:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm=JWT_ALGORITHM, headers={"kid": secret_id(secret)})


def token_claims_unverified(token: str) -> dict[str, Any]:
    """A token's claims without checking them: for ``token revoke`` to find its jti."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise AuthError("token malformed") from None
    return dict(claims)


def verify_jwt(token: str, verifier: Verifier | str, *, now: float | None = None) -> Identity:
    checks = Verifier.of(verifier)
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError:
        raise AuthError("token malformed") from None
    required = (
        ["exp", "sub"] + (["iss"] if checks.issuer else []) + (["aud"] if checks.audience else [])
    )
    try:
        claims = jwt.decode(
            token,
            checks.jwt_secret_for(kid),
            algorithms=[JWT_ALGORITHM],
            options={"require": required, "verify_sub": False},
            issuer=checks.issuer,
            audience=checks.audience,
            leeway=0,
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError("token signature invalid") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(f"token lacks claim {exc.claim}") from None
    except jwt.InvalidIssuerError:
        raise AuthError("token issuer not accepted") from None
    except jwt.InvalidAudienceError:
        raise AuthError("token audience not accepted") from None
    except jwt.InvalidTokenError:
        raise AuthError("token malformed") from None
    current = time.time() if now is None else now
    if claims["exp"] <= current:
        raise AuthError("token expired")
    issued = claims.get("iat")
    start = issued if isinstance(issued, (int, float)) and issued <= current else current
    if claims["exp"] - start > checks.max_ttl_s:
        raise AuthError("token lifetime exceeds JWT_MAX_TTL")
    try:
        role = Role(claims.get("role"))
    except ValueError:
        raise AuthError("token role must be one of drone, observer, operator, admin") from None
    subject = _check_subject(claims["sub"], "token sub")
    acl = claims.get("acl")
    if acl is not None and not isinstance(acl, dict):
        raise AuthError("acl claim must be a map")
    amr = claims.get("amr", [])
    if not isinstance(amr, list) or not all(isinstance(item, str) for item in amr):
        raise AuthError("amr claim must be a list of strings")
    return Identity(
        role=role,
        subject=subject,
        permissions=Permissions.for_role(role, subject, acl),
        credential_id=claims.get("jti"),
        expires_at=float(claims["exp"]),
        amr=tuple(amr),
    )


# API keys. Version 2 names the secret that signed it and may expire:
#   sek2.<base64url drone id>.<key id>.<expires: Unix seconds, 0 = never>.<kid>.<signature>
# Version 1 (sek1.<drone>.<key id>.<signature>) still verifies, with any secret in force.
# The signature is base64url HMAC-SHA256 over every other field.


@dataclass(frozen=True)
class ApiKey:
    key: str
    key_id: str
    drone_id: str
    expires_at: float | None = None


@dataclass(frozen=True)
class ParsedKey:
    drone_id: str
    key_id: str
    expires_at: float | None
    kid: str | None
    signed: str  # what the signature covers
    signature: str


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _api_key_signature(secret: str, signed: str) -> str:
    return _b64(hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest())


def issue_api_key(
    secret: str, drone_id: str, *, ttl_s: float | None = None, now: float | None = None
) -> ApiKey:
    drone_id = _check_subject(drone_id, "drone id")
    key_id = secrets.token_hex(8)
    expires = 0 if ttl_s is None else int((time.time() if now is None else now) + ttl_s)
    kid = secret_id(secret)
    signed = f"{API_KEY_PREFIX_V2}\n{drone_id}\n{key_id}\n{expires}\n{kid}"
    signature = _api_key_signature(secret, signed)
    key = f"{API_KEY_PREFIX_V2}.{_b64(drone_id.encode())}.{key_id}.{expires}.{kid}.{signature}"
    return ApiKey(key=key, key_id=key_id, drone_id=drone_id, expires_at=expires or None)


def parse_api_key(key: str) -> ParsedKey:
    """Split a key into its fields without verifying it."""
    parts = key.split(".")
    try:
        drone_id = _unb64(parts[1]).decode("utf-8") if len(parts) > 1 else ""
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise AuthError("api key malformed") from None
    if len(parts) == 4 and parts[0] == API_KEY_PREFIX:
        signed = f"{drone_id}\n{parts[2]}"
        return ParsedKey(drone_id, parts[2], None, None, signed, parts[3])
    if len(parts) == 6 and parts[0] == API_KEY_PREFIX_V2 and parts[3].isdigit():
        expires = int(parts[3])
        signed = f"{API_KEY_PREFIX_V2}\n{drone_id}\n{parts[2]}\n{expires}\n{parts[4]}"
        return ParsedKey(drone_id, parts[2], float(expires) or None, parts[4], signed, parts[5])
    raise AuthError("api key malformed")


def verify_api_key(verifier: Verifier | str, key: str, *, now: float | None = None) -> ApiKey:
    parsed = parse_api_key(key)
    signature = parsed.signature.encode()
    if not any(
        hmac.compare_digest(_api_key_signature(secret, parsed.signed).encode(), signature)
        for secret in Verifier.of(verifier).api_key_secret_for(parsed.kid)
    ):
        raise AuthError("api key invalid")
    if parsed.expires_at is not None and parsed.expires_at <= (time.time() if now is None else now):
        raise AuthError("api key expired")
    return ApiKey(
        key=key,
        key_id=parsed.key_id,
        drone_id=_check_subject(parsed.drone_id, "drone id"),
        expires_at=parsed.expires_at,
    )


def drone_identity(api_key: ApiKey) -> Identity:
    return Identity(
        role=Role.DRONE,
        subject=api_key.drone_id,
        permissions=Permissions.for_role(Role.DRONE, api_key.drone_id),
        credential_id=api_key.key_id,
        expires_at=api_key.expires_at,
        via_api_key=True,
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


def authenticate(credentials: Credentials, verifier: Verifier) -> Identity:
    """Verify what a handshake presented; revocation is checked by the caller."""
    if credentials.api_key and credentials.token:
        raise AuthError("present either an api key or a token, not both")
    if credentials.token:
        return verify_jwt(credentials.token, verifier)
    if credentials.api_key:
        return drone_identity(verify_api_key(verifier, credentials.api_key))
    raise AuthError("no credentials: send X-API-Key or Authorization: Bearer")
