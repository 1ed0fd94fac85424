"""The opening handshake: who is connecting, whether they may, and which session they get.

Rules for this module:
- Everything is decided before any WebSocket opens, and a refusal is an HTTP answer with a JSON
  body ``{"error", "reason"}``: 401 bad credentials, 429 too many connections for the
  identity, 503 (with ``Retry-After``) when the server is full or draining or the router cannot
  count the connection or resume its session right now.
- A connection the identity's shard counted is uncounted whatever happens next: a refusal after
  the count sends ``DISCONNECT`` at once; an admitted one sends it when its socket is lost.
- Secrets never appear in a reason: reasons name what was wrong, not what was sent.
"""

from __future__ import annotations

import asyncio
import http
import itertools
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from websockets.datastructures import Headers

from sentientedge import routing
from sentientedge.auth import Credentials, Identity, authenticate
from sentientedge.errors import AuthError, RouterUnavailable, StoreUnavailable
from sentientedge.ingress.http import HttpRequest
from sentientedge.ingress.links import next_request_id
from sentientedge.ratelimit import AddressLimiter
from sentientedge.records import SessionRecord
from sentientedge.virtual import ring_key

if TYPE_CHECKING:
    from sentientedge.ingress.server import IngressServer

HANDSHAKE_TIMEOUT_S = 5.0
RETRY_AFTER_S = 5


class Refused(Exception):
    """The handshake is answered with this HTTP response instead of a WebSocket."""

    def __init__(self, answer: bytes) -> None:
        super().__init__("handshake refused")
        self.answer = answer


@dataclass
class Admission:
    """What the handshake established, handed to the connection."""

    identity: Identity
    connection_id: str
    session_id: str
    resumed: SessionRecord | None = None


class Handshake:
    def __init__(self, server: IngressServer) -> None:
        self.server = server
        self._connection_ids = itertools.count(1)
        rate = server.config.handshake_rate
        self.limiter = AddressLimiter(rate, 5 * rate)
        self._epoch = uuid.uuid4().hex[:8]

    def _refuse(
        self,
        status: http.HTTPStatus,
        error: str,
        reason: str,
        headers: dict[str, str] | None = None,
        *,
        address: str,
        who: str | None = None,
    ) -> Refused:
        self.server.audit.record(
            "handshake_refused",
            status=status.value,
            error=error,
            reason=reason,
            address=address,
            principal=who,
        )
        return Refused(self.server.endpoints.reject(status, error, reason, headers))

    def _unavailable(self, reason: str, address: str, who: str | None = None) -> Refused:
        return self._refuse(
            http.HTTPStatus.SERVICE_UNAVAILABLE,
            "unavailable",
            reason,
            {"Retry-After": str(RETRY_AFTER_S)},
            address=address,
            who=who,
        )

    def check_rate(self, address: str) -> None:
        """429 for an address opening connections faster than ``HANDSHAKE_RATE``: every fresh
        connection costs a session and a count at a shard, so reconnect loops are bounded."""
        limiter = self.limiter
        if not limiter.allow(address):
            raise self._refuse(
                http.HTTPStatus.TOO_MANY_REQUESTS,
                "too_many_handshakes",
                f"more than {limiter.rate:g} connections a second from one address",
                {"Retry-After": str(limiter.retry_after())},
                address=address,
            )

    def check_room(self, address: str) -> None:
        """503 when this ingress is draining or full (``MAX_WS_CONNECTIONS``)."""
        server = self.server
        if server.draining:
            raise self._unavailable("server draining", address)
        if server.in_use() >= server.config.max_ws_connections:
            raise self._unavailable("server full", address)

    async def admit(self, request: HttpRequest, address: str) -> Admission:
        """Authenticate, count the connection at the identity's shard, find its session."""
        server = self.server
        try:
            identity = await self._authenticate(request)
        except AuthError as exc:
            raise self._refuse(
                http.HTTPStatus.UNAUTHORIZED, "unauthorized", exc.reason, address=address
            ) from None
        connection_id = f"{server.name}.{self._epoch}.{next(self._connection_ids)}"
        link = server.shards.owner(ring_key(identity.principal))
        try:
            granted = await asyncio.wait_for(
                link.request(
                    (routing.CONNECT, next_request_id(), identity.principal, connection_id)
                ),
                HANDSHAKE_TIMEOUT_S,
            )
        except (RouterUnavailable, asyncio.TimeoutError):
            # The CONNECT may still arrive and be counted: release it, in order after it.
            self.release(identity, connection_id, "not admitted")
            raise self._unavailable("router not ready", address, identity.principal) from None
        if granted:
            # During a reshard the identity's next owner counts the connection too.
            for other in server.shards.owners(ring_key(identity.principal))[1:]:
                other.push((routing.RESTORE, identity.principal, connection_id), control=True)
        else:
            config = server.config
            limit = (
                config.max_connections_per_drone
                if identity.is_drone
                else config.max_connections_per_user
            )
            raise self._refuse(
                http.HTTPStatus.TOO_MANY_REQUESTS,
                "too_many_connections",
                f"{identity.principal} already has {limit} connections",
                address=address,
                who=identity.principal,
            )
        try:
            session_id, record = await self._session_for(identity, request)
        except StoreUnavailable:
            # Resuming needs Redis; a fresh session instead would orphan the old one's messages.
            self.release(identity, connection_id, "not admitted")
            raise self._unavailable(
                "session store unavailable, retry to resume", address, identity.principal
            ) from None
        return Admission(identity, connection_id, session_id, record)

    def release(self, identity: Identity, connection_id: str, reason: str) -> None:
        """Uncount a connection at its identity's shard."""
        for link in self.server.shards.owners(ring_key(identity.principal)):
            link.push((routing.DISCONNECT, identity.principal, connection_id, reason), control=True)

    async def _authenticate(self, request: HttpRequest) -> Identity:
        credentials = Credentials.from_request(request.headers, request.query)
        identity = authenticate(credentials, self.server.verifier)
        if await self.server.store.is_revoked(identity):
            raise AuthError("api key revoked" if identity.via_api_key else "token revoked")
        return identity

    async def _session_for(
        self, identity: Identity, request: HttpRequest
    ) -> tuple[str, SessionRecord | None]:
        """The session to resume (same identity, not expired), else a fresh one."""
        wanted = request.query.get("session") or _single(request.headers, "X-Session")
        if wanted:
            record = await self.server.store.claim_session(
                wanted, identity.principal, self.server.name
            )
            if record is not None:
                return wanted, record
        return uuid.uuid4().hex, None


def _single(headers: Headers, name: str) -> str | None:
    try:
        return headers.get(name)
    except LookupError:  # the header twice: ambiguous, so nothing
        return None
