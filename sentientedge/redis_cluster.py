"""Where a router's keys are served in a Redis Cluster (``REDIS_URL`` naming a cluster node).

Rules for this module:
- A router's keys share the hash tag ``{namespace}`` (:func:`key_prefix`): one slot, so every
  script of :mod:`sentientedge.store` keeps its all-or-nothing meaning there.
- The store's connections go to the master serving that slot (:class:`ClusterEndpoint`), and
  to its successor after a failover; :mod:`sentientedge.store` does everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import MovedError

from sentientedge.errors import StoreUnavailable

log = logging.getLogger(__name__)

_TIMEOUT_S = 2.0
_ASK_TIMEOUT_S = 0.5  # a cluster node asked where a slot is served
_KNOWN_NODES = 64  # cluster nodes remembered to ask next time


def key_prefix(namespace: str, cluster: bool) -> str:
    """Every key of a router starts with this. On a Redis Cluster the namespace is a hash tag:
    all of a router's keys share one slot, so each script (a message stored, its dedupe record
    and every subscribed session's queue, at once) runs on one node, whole or not at all."""
    return "{" + namespace + "}" if cluster else namespace


def _host(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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


def slot_owner(slots: Any, slot: int) -> tuple[tuple[str, int], int, list[tuple[str, int]]]:
    """From a ``CLUSTER SLOTS`` reply: the master serving ``slot``, its replica count, and
    every node named."""
    nodes: list[tuple[str, int]] = []
    found: tuple[tuple[str, int], int] | None = None
    for low, high, master, *replicas in slots:
        named = [(_host(n[0]), int(n[1])) for n in (master, *replicas)]
        nodes.extend(named)
        if int(low) <= slot <= int(high):
            found = (named[0], len(replicas))
    if found is None:
        raise LookupError(f"no node serves slot {slot}")
    return found[0], found[1], nodes


def cluster_master(url: str, namespace: str) -> tuple[str, int, int]:
    """The master serving a router's slot now, and how many replicas it has (sync, for the CLI
    and ``up``)."""
    slot = key_slot(key_prefix(namespace, True).encode())
    client = redis.Redis.from_url(url, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S)
    try:
        (host, port), replicas, _ = slot_owner(client.execute_command("CLUSTER SLOTS"), slot)
        return host, port, replicas
    except (redis.RedisError, OSError, LookupError) as exc:
        raise StoreUnavailable(f"redis cluster: {type(exc).__name__}: {exc}"[:200]) from None
    finally:
        client.close()


class ClusterEndpoint:
    """Where a router's slot is served in a Redis Cluster, learned again after a failover.

    Any node answers ``CLUSTER SLOTS``; the nodes it names are asked next time, so the node in
    ``REDIS_URL`` may itself be gone. Asked at most every ``REFRESH_S``: while a replica is being
    promoted the answer is the dead master, and every failed command would otherwise ask again.
    """

    REFRESH_S = 0.25

    def __init__(self, url: str, namespace: str) -> None:
        parts: dict[str, Any] = dict(parse_url(url))
        seed = (str(parts.get("host", "127.0.0.1")), int(parts.get("port", 6379)))
        self._username: str | None = parts.get("username")
        self._password: str | None = parts.get("password")
        self._nodes: list[tuple[str, int]] = [seed]
        self._slot = key_slot(key_prefix(namespace, True).encode())
        self._address: tuple[str, int] | None = None
        self._asked_at = 0.0
        self._asking: asyncio.Lock = asyncio.Lock()
        self._refreshing: asyncio.Task[None] | None = None
        # Called when the slot moved: connections open to the old node (alive as a replica,
        # say) must be closed, or they keep answering MOVED and READONLY.
        self.on_move: Callable[[], None] | None = None

    async def address(self) -> tuple[str, int]:
        if self._address is None:
            await self.refresh(force=True)
        assert self._address is not None
        return self._address

    async def refresh(self, force: bool = False) -> None:
        async with self._asking:
            if not force and time.monotonic() - self._asked_at < self.REFRESH_S:
                return
            self._asked_at = time.monotonic()
            failures = []
            # The node that failed is asked last: dead, it costs a refused connection; just
            # restarted, it may still claim the slot it lost while it was down.
            nodes = [n for n in dict.fromkeys(self._nodes) if n != self._address]
            if self._address is not None:
                nodes.append(self._address)
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
                    master, _, named = slot_owner(slots, self._slot)
                except (redis.RedisError, OSError, LookupError) as exc:
                    failures.append(f"{host}:{port}: {type(exc).__name__}")
                    continue
                finally:
                    await client.aclose()
                self._move_to(master)
                self._nodes = list(dict.fromkeys([master, *named, *self._nodes]))[:_KNOWN_NODES]
                return
            raise redis.ConnectionError(f"no cluster node answered: {', '.join(failures)}")

    def _move_to(self, address: tuple[str, int]) -> None:
        if address == self._address:
            return
        first = self._address is None
        self._address = address
        if first:
            log.info("redis cluster: the router's slot is served by %s:%d", *address)
            return
        log.warning("redis cluster: the router's slot moved to %s:%d", *address)
        if self.on_move is not None:
            self.on_move()

    def suspect(self, error: BaseException | None = None) -> None:
        """A command failed: the slot may have moved. A ``MOVED`` answer says where; otherwise
        learn it in the background (one question at a time)."""
        if isinstance(error, MovedError):
            self._move_to((str(error.host), int(error.port)))
            return
        if self._refreshing is not None and not self._refreshing.done():
            return
        with contextlib.suppress(RuntimeError):  # no running loop: the next connect asks
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            await self.refresh()


class SlotConnection(aioredis.Connection):
    """A connection to wherever the router's slot is served when it (re)connects."""

    def __init__(self, *, endpoint: ClusterEndpoint, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._endpoint = endpoint

    async def _connect(self) -> None:
        self.host, self.port = await self._endpoint.address()
        await super()._connect()
