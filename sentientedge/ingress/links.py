"""The ingress's streams to the topic shards: the hash ring and one link per shard.

Rules for this module:
- Every shard gets a :class:`sentientedge.streams.StreamLink`, connected at start and kept
  connected (a shard's address comes from Ray, and changes when Ray starts the shard again).
- Everything but QoS 0 is kept until the shard handled it, and sent again to a restarted shard;
  a shard's new process (its epoch changed) also gets, through ``on_restart``, everything this
  ingress had registered there.
- A request is an item whose second element is a request id from :func:`next_request_id`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

from sentientedge import routing
from sentientedge.ring import HashRing
from sentientedge.streams import Resolve, StreamLink
from sentientedge.wire import Item

_request_ids = itertools.count(1)


def next_request_id() -> int:
    return next(_request_ids)


def keep(item: Item) -> bool:
    # Requests, QoS 1 and the books (subscriptions, connections, sessions) are idempotent and
    # must not be lost; QoS 0 may be.
    return bool(item[0] != routing.PUB)


class ShardLinks:
    """The ring the ingress routes by and a link to every shard on it.

    During a reshard there are two rings: ``ring`` (publications and requests go by it) and
    ``next_ring`` (announced, not yet in force). Registrations (subscriptions, connections,
    sessions) go to the owners on both, so that when the next ring takes over, its owners
    already know everything (:meth:`owners`).
    """

    def __init__(
        self,
        name: str,
        epoch: str,
        shards: list[str],
        resolve: Callable[[str], Resolve],
        key: bytes,
        on_items: Callable[[list[Item]], None],
        max_backlog: int = 100_000,
    ) -> None:
        self.ring = HashRing(shards)
        self.next_ring: HashRing | None = None
        self.on_restart: Callable[[str], None] = lambda shard: None
        self._name = name
        self._epoch = epoch
        self._resolve = resolve
        self._key = key
        self._on_items = on_items
        self._max_backlog = max_backlog
        self._links: dict[str, StreamLink] = {}
        for shard in shards:
            self._add(shard)

    def _add(self, shard: str) -> StreamLink:
        link = StreamLink(
            self._name,
            self._epoch,
            shard,
            self._resolve(shard),
            self._key,
            self._on_items,
            keep=keep,
            max_backlog=self._max_backlog,
        )
        link.on_peer_restart = lambda: self.on_restart(shard)
        self._links[shard] = link
        return link

    @property
    def shards(self) -> tuple[str, ...]:
        return self.ring.nodes

    def link(self, shard: str) -> StreamLink:
        return self._links[shard]

    def owner(self, key: str) -> StreamLink:
        """The link to the shard that owns ``key`` on the ring in force."""
        return self._links[self.ring.owner(key)]

    def owners(self, key: str) -> list[StreamLink]:
        """The owner of ``key`` on the ring in force, then, during a reshard, its owner on the
        next ring if that is another shard."""
        first = self._links[self.ring.owner(key)]
        if self.next_ring is None:
            return [first]
        second = self._links[self.next_ring.owner(key)]
        return [first] if second is first else [first, second]

    def all(self) -> list[StreamLink]:
        """Every link: the shards of the ring in force and of the next one."""
        return list(self._links.values())

    async def connect(self, timeout: float) -> dict[str, bool]:
        """Start every link and wait (up to ``timeout``) until each has said hello."""
        done = await asyncio.gather(*(link.wait_connected(timeout) for link in self.all()))
        return dict(zip(self._links, done, strict=True))

    # Resharding: announce, take over, finish (the controller runs each on every ingress)

    async def announce(self, shards: list[str], timeout: float) -> list[str]:
        """Open links to the new ring's new shards; it becomes ``next_ring``. Returns the
        shards that did not say hello within ``timeout``."""
        new = [self._add(shard) for shard in shards if shard not in self._links]
        self.next_ring = HashRing(shards)
        done = await asyncio.gather(*(link.wait_connected(timeout) for link in new))
        return [link.peer for link, ok in zip(new, done, strict=True) if not ok]

    async def take_over(self, fence_s: float) -> bool:
        """Put the next ring in force. Whatever is sent from now on waits until every request
        sent before has been answered (or ``fence_s`` passed): a QoS 1 message's new owner
        must not store it before its old owner stored the ones before it. Returns whether the
        fence closed in time."""
        assert self.next_ring is not None, "announce first"
        links = self.all()
        waiting = {link: link.waiting() for link in links}
        for link in links:
            link.flush()  # what is queued went by the old ring: it leaves before the fence
            link.hold()
        self.ring, self.next_ring = self.next_ring, None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + fence_s
        try:
            while any(ids & link.waiting() for link, ids in waiting.items()):
                if loop.time() > deadline:
                    return False
                await asyncio.sleep(0.002)
            return True
        finally:
            for link in links:
                link.release()

    async def finish(self) -> list[str]:
        """Close the links to shards the ring in force no longer has; returns them."""
        gone = [shard for shard in self._links if shard not in self.ring.nodes]
        for shard in gone:
            await self._links.pop(shard).close()
        return gone

    async def drain(self, timeout: float) -> None:
        """Until everything queued has left and the shards have acknowledged it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and any(
            link.connected and (link.backlog or link.state.unacked) for link in self.all()
        ):
            await asyncio.sleep(0.01)

    def stats(self) -> dict[str, Any]:
        return {shard: link.stats() for shard, link in self._links.items()}

    async def close(self) -> None:
        for link in self.all():
            await link.close()
