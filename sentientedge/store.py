"""Everything the router keeps in Redis. The only module that talks to Redis.

Rules for this module:
- Keys start with ``{namespace}:`` so several routers can share one Redis.
- Every Redis failure surfaces as :class:`StoreUnavailable`; callers decide what degrades.
- Async (redis.asyncio) for the actors, sync helpers for the CLI.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from sentientedge.errors import StoreUnavailable

_TIMEOUT_S = 2.0


class Keys:
    def __init__(self, namespace: str) -> None:
        self.revoked_keys = f"{namespace}:apikeys:revoked"
        self.issued_keys = f"{namespace}:apikeys:issued"


class Store:
    """The async store used inside the router's processes."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.keys = Keys(namespace)
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S, decode_responses=True
        )
        self._revoked_cache: set[str] = set()

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (redis.RedisError, OSError):
            return False

    async def is_revoked(self, key_id: str) -> bool:
        """Whether an API key was revoked.

        When Redis cannot answer, the last set read decides: a Redis outage must not lock every
        drone out, and revocations older than the outage still hold.
        """
        try:
            revoked = bool(await self._redis.sismember(self.keys.revoked_keys, key_id))
        except (redis.RedisError, OSError):
            return key_id in self._revoked_cache
        if revoked:
            self._revoked_cache.add(key_id)
        return revoked

    async def refresh_revocations(self) -> None:
        try:
            members = await self._redis.smembers(self.keys.revoked_keys)
            self._revoked_cache = {str(m) for m in members}
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from None


class AdminStore:
    """Synchronous access for the CLI: API key registry and revocation."""

    def __init__(self, url: str, namespace: str) -> None:
        self.keys = Keys(namespace)
        self._redis = redis.Redis.from_url(
            url, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S, decode_responses=True
        )

    def _do(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis unavailable: {exc}") from None

    def record_issued(self, key_id: str, drone_id: str) -> None:
        record = json.dumps({"drone": drone_id, "issued_at": int(time.time())})
        self._do(self._redis.hset, self.keys.issued_keys, key_id, record)

    def revoke(self, key_id: str) -> bool:
        """Revoke a key id; False when it was already revoked."""
        return bool(self._do(self._redis.sadd, self.keys.revoked_keys, key_id))

    def issued(self) -> dict[str, dict[str, Any]]:
        raw = self._do(self._redis.hgetall, self.keys.issued_keys)
        return {key_id: json.loads(record) for key_id, record in raw.items()}

    def revoked(self) -> set[str]:
        return set(self._do(self._redis.smembers, self.keys.revoked_keys))

    def close(self) -> None:
        self._redis.close()
