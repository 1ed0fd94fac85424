"""Credentials that end while their connection is open: expiry and revocation.

Rules for this module:
- A connection lives no longer than the credential it presented: when its JWT or API key
  expires, or is revoked anywhere in the cluster, it is closed with 4001 (PROTOCOL.md, close
  codes). The client reconnects with fresh credentials and resumes its session.
- Expiries sit in one heap, revocations arrive on one Redis stream: one timer a second for
  every connection, no task per connection.
- At most a second late for expiry, about a second for a revocation (the CLI writes it to
  Redis, every ingress reads the stream each second).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from sentientedge.errors import StoreUnavailable
from sentientedge.protocol import CloseCode

if TYPE_CHECKING:
    from sentientedge.ingress.connection import ClientConnection
    from sentientedge.ingress.server import IngressServer

log = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0


class ExpiryHeap:
    """Connections by the time their credential ends (pure: the caller gives the time)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._order = 0

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, expires_at: float, connection_id: str) -> None:
        self._order += 1
        heapq.heappush(self._heap, (expires_at, self._order, connection_id))

    def due(self, now: float) -> list[str]:
        """Connection ids whose credential has ended by ``now`` (each once)."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out


class CredentialWatch:
    def __init__(self, server: IngressServer, clock: Callable[[], float] = time.time) -> None:
        self.server = server
        self.clock = clock
        self.expiries = ExpiryHeap()
        self._cursor: str | None = None

    def track(self, conn: ClientConnection) -> None:
        expires_at = conn.identity.expires_at
        if expires_at is not None:
            self.expiries.add(expires_at, conn.connection_id)

    async def run(self) -> None:
        while True:
            try:
                self._close_expired()
                await self._close_revoked()
            except StoreUnavailable:
                pass  # revocations wait for Redis; the handshake's cache still refuses
            except Exception:  # the watch must outlive any one failure
                log.exception("credential watch failed")
            await asyncio.sleep(CHECK_EVERY_S)

    def _close_expired(self) -> None:
        connections = self.server.connections
        for connection_id in self.expiries.due(self.clock()):
            conn = connections.get(connection_id)
            if conn is not None:
                self._end(conn, "credentials expired")

    async def _close_revoked(self) -> None:
        store = self.server.store
        if self._cursor is None:
            self._cursor = await store.revocation_cursor()
            return
        self._cursor, revoked = await store.revocations_after(self._cursor)
        if revoked:
            self.close_using(revoked)

    def close_using(self, credentials: Iterable[str]) -> int:
        ended = set(credentials)
        closing = [
            conn
            for conn in self.server.connections.values()
            if conn.identity.credential_id in ended
        ]
        for conn in closing:
            self._end(conn, "credentials revoked")
        return len(closing)

    def _end(self, conn: ClientConnection, reason: str) -> None:
        log.info("closing %s: %s", conn.connection_id, reason)
        self.server.close(conn, CloseCode.CREDENTIALS_ENDED, reason)
