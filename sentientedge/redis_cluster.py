"""Where a router's keys are served in a Redis Cluster (``REDIS_URL`` naming a cluster node).

Rules for this module:
- Keys of one topic, one session or one drone share a hash tag (:class:`sentientedge.store.Keys`),
  so a router's writes spread over every master; the keys shared by the whole router (API keys,
  revocations, admins, the shape) share the tag ``{namespace}`` (:func:`key_prefix`).
- :class:`ClusterNodes` knows which master serves each slot and keeps a client per master; a
  failed command makes it ask the cluster again. :mod:`sentientedge.store` does everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import MovedError

from sentientedge.errors import StoreUnavailable

log = logging.getLogger(__name__)

_TIMEOUT_S = 2.0
_ASK_TIMEOUT_S = 0.5  # a cluster node asked where the slots are served
_KNOWN_NODES = 64  # cluster nodes remembered to ask next time

Address = tuple[str, int]


def key_prefix(namespace: str, cluster: bool) -> str:
    """The start of the keys a whole router shares. On a Redis Cluster the namespace is a hash
    tag: they live in one slot, so a multi-key command over them runs on one node."""
    return "{" + namespace + "}" if cluster else namespace


def _host(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@functools.lru_cache(maxsize=1 << 16)
def slot_of(key: str) -> int:
    """A key's hash slot; remembered, since a batch names the same topics and sessions again
    and again."""
    return key_slot(key.encode())


def is_cluster(url: str) -> bool:
    """Whether ``url`` is a node of a Redis Cluster (``INFO cluster``); for ``up`` and the CLI.
    Raises :class:`StoreUnavailable` when it cannot be asked."""
    client = redis.Redis.from_url(url, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S)
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except (redis.RedisError, OSError) as exc:
        raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}"[:200]) from None
    finally:
        client.close()


def slot_table(slots: Any) -> tuple[list[Address | None], dict[Address, int], list[Address]]:
    """From a ``CLUSTER SLOTS`` reply: the master of every slot (None: unserved), each
    master's replica count, and every node named."""
    owners: list[Address | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
    replicas: dict[Address, int] = {}
    nodes: list[Address] = []
    for low, high, master, *copies in slots:
        named = [(_host(n[0]), int(n[1])) for n in (master, *copies)]
        nodes.extend(named)
        owners[int(low) : int(high) + 1] = [named[0]] * (int(high) - int(low) + 1)
        replicas[named[0]] = len(copies)
    return owners, replicas, nodes


def slot_owner(slots: Any, slot: int) -> tuple[Address, int, list[Address]]:
    """From a ``CLUSTER SLOTS`` reply: the master serving ``slot``, its replica count, and
    every node named."""
    owners, replicas, nodes = slot_table(slots)
    master = owners[slot]
    if master is None:
        raise LookupError(f"no node serves slot {slot}")
    return master, replicas[master], nodes


def _ask_sync(url: str) -> Any:
    client = redis.Redis.from_url(url, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S)
    try:
        return client.execute_command("CLUSTER SLOTS")
    except (redis.RedisError, OSError) as exc:
        raise StoreUnavailable(f"redis cluster: {type(exc).__name__}: {exc}"[:200]) from None
    finally:
        client.close()


def cluster_master(url: str, namespace: str) -> tuple[str, int, int]:
    """The master serving the keys a router shares, and how many replicas it has (sync, for the
    CLI)."""
    slot = key_slot(key_prefix(namespace, True).encode())
    try:
        (host, port), replicas, _ = slot_owner(_ask_sync(url), slot)
    except LookupError as exc:
        raise StoreUnavailable(f"redis cluster: {exc}") from None
    return host, port, replicas


def cluster_masters(url: str) -> dict[Address, int]:
    """Every master of the cluster and its replica count (sync, for ``up``)."""
    _, replicas, _ = slot_table(_ask_sync(url))
    return replicas


class ClusterNodes:
    """Which master serves each slot of a Redis Cluster, and a client per master.

    Any node answers ``CLUSTER SLOTS``; the nodes it names are asked next time, so the node in
    ``REDIS_URL`` may itself be gone. Asked at most every ``REFRESH_S``: while a replica is being
    promoted the answer still names the dead master, and every failed command would ask again.
    A master that comes back as a replica serves no slot and its client is no longer used.
    """

    REFRESH_S = 0.25

    def __init__(self, url: str, client_for: Callable[[str, int], aioredis.Redis]) -> None:
        """``client_for(host, port)`` makes the client (and its pool) for one master."""
        parts: dict[str, Any] = dict(parse_url(url))
        self._seed: Address = (str(parts.get("host", "127.0.0.1")), int(parts.get("port", 6379)))
        self._username: str | None = parts.get("username")
        self._password: str | None = parts.get("password")
        self._make_client = client_for
        self._nodes: list[Address] = [self._seed]
        self._owners: list[Address | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._clients: dict[Address, aioredis.Redis] = {}
        self._asked_at = 0.0
        self._asking: asyncio.Lock | None = None
        self._refreshing: asyncio.Task[None] | None = None
        # Learned at once, synchronously: every command needs the table, and a store is made
        # before its first command. A cluster that does not answer now is asked again later.
        with contextlib.suppress(StoreUnavailable):
            self._learn(_ask_sync(url))

    def client(self, key: str) -> aioredis.Redis:
        """The client of the master serving ``key`` (the seed node while nothing is known)."""
        return self._client_at(self._owners[slot_of(key)] or self._seed)

    def _client_at(self, address: Address) -> aioredis.Redis:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = self._make_client(*address)
        return client

    def masters(self) -> list[aioredis.Redis]:
        """A client for every master serving slots now (a scan asks each of them)."""
        served = {a for a in self._owners if a is not None} or {self._seed}
        return [self._client_at(a) for a in sorted(served)]

    def a_key_on_each_master(self) -> list[tuple[aioredis.Redis, str]]:
        """Every master serving slots now, with a key name in one of its slots."""
        found: dict[Address, str] = {}
        served = {a for a in self._owners if a is not None}
        for n in range(100_000):
            if len(found) == len(served):
                break
            name = "{m" + str(n) + "}"
            owner = self._owners[key_slot(name.encode())]
            if owner is not None:
                found.setdefault(owner, name)
        return [(self._client_at(address), name) for address, name in sorted(found.items())]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose(close_connection_pool=True)

    def _learn(self, slots: Any) -> None:
        owners, _, named = slot_table(slots)
        moved = {
            new for old, new in zip(self._owners, owners, strict=True) if new and old and old != new
        }
        self._owners = owners
        self._nodes = list(dict.fromkeys([*named, *self._nodes]))[:_KNOWN_NODES]
        for address in sorted(moved):
            log.warning("redis cluster: slots moved to %s:%d", *address)

    async def refresh(self, force: bool = False) -> None:
        if self._asking is None:
            self._asking = asyncio.Lock()
        async with self._asking:
            if not force and time.monotonic() - self._asked_at < self.REFRESH_S:
                return
            self._asked_at = time.monotonic()
            failures = []
            # Masters that failed are asked last: dead, they cost a refused connection; just
            # restarted, they may still claim the slots they lost while they were down.
            served = {a for a in self._owners if a is not None}
            nodes = sorted(dict.fromkeys(self._nodes), key=lambda n: n in served)
            for host, port in nodes:
                client = aioredis.Redis(
                    host=host,
                    port=port,
                    socket_timeout=_ASK_TIMEOUT_S,
                    socket_connect_timeout=_ASK_TIMEOUT_S,
                    username=self._username,
                    password=self._password,
                    retry=Retry(NoBackoff(), 0),  # the next node, not this one again
                )
                try:
                    slots = await client.execute_command("CLUSTER SLOTS")
                    if not slots:
                        raise LookupError("no slots")
                except (redis.RedisError, OSError, LookupError) as exc:
                    failures.append(f"{host}:{port}: {type(exc).__name__}")
                    continue
                finally:
                    await client.aclose()
                self._learn(slots)
                return
            raise redis.ConnectionError(f"no cluster node answered: {', '.join(failures)}")

    def suspect(self, error: BaseException | None = None) -> None:
        """A command failed: its slot may have moved. A ``MOVED`` answer says where; either way
        the whole table is learned again in the background (one question at a time)."""
        if isinstance(error, MovedError):
            self._owners[int(error.slot_id)] = (str(error.host), int(error.port))
        if self._refreshing is not None and not self._refreshing.done():
            return
        with contextlib.suppress(RuntimeError):  # no running loop: the next command asks
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            await self.refresh()
