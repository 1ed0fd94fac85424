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
        self.on_restart: Callable[[str], None] = lambda shard: None
        self._links: dict[str, StreamLink] = {}
        for shard in shards:
            link = StreamLink(
                name,
                epoch,
                shard,
                resolve(shard),
                key,
                on_items,
                keep=keep,
                max_backlog=max_backlog,
            )
            link.on_peer_restart = lambda shard=shard: self.on_restart(shard)  # type: ignore[misc]
            self._links[shard] = link

    @property
    def shards(self) -> tuple[str, ...]:
        return self.ring.nodes

    def link(self, shard: str) -> StreamLink:
        return self._links[shard]

    def owner(self, key: str) -> StreamLink:
        """The link to the shard that owns ``key`` on the ring."""
        return self._links[self.ring.owner(key)]

    def all(self) -> list[StreamLink]:
        return list(self._links.values())

    async def connect(self, timeout: float) -> dict[str, bool]:
        """Start every link and wait (up to ``timeout``) until each has said hello."""
        done = await asyncio.gather(*(link.wait_connected(timeout) for link in self.all()))
        return dict(zip(self._links, done, strict=True))

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
