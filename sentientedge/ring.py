"""Consistent hashing with virtual nodes: which shard owns a key.

Rules for this module:
- The hash is BLAKE2b with a fixed key. Changing ``_HASH_KEY`` or the virtual-node naming
  remaps every topic, drone and session in a running cluster: don't.
- Virtual-node positions come from stable shard names, never from process ids or addresses,
  so every ingress and every restart computes the same ring.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

_HASH_KEY = b"sentientedge-ring-v1"
DEFAULT_VNODES = 160


def _hash(key: str) -> int:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=_HASH_KEY).digest()
    return int.from_bytes(digest, "big")


class EmptyRing(LookupError):
    pass


class HashRing:
    """An immutable ring; build a new one when the shard set changes."""

    def __init__(self, nodes: Iterable[str], vnodes: int = DEFAULT_VNODES) -> None:
        self.nodes: tuple[str, ...] = tuple(sorted(set(nodes)))
        self.vnodes = vnodes
        points = sorted(
            (_hash(f"{node}#{replica}"), node) for node in self.nodes for replica in range(vnodes)
        )
        self._positions = [position for position, _ in points]
        self._owners = [node for _, node in points]
        self._cache: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.nodes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HashRing) and (self.nodes, self.vnodes) == (
            other.nodes,
            other.vnodes,
        )

    def __hash__(self) -> int:
        return hash((self.nodes, self.vnodes))

    def __repr__(self) -> str:
        return f"HashRing({list(self.nodes)!r}, vnodes={self.vnodes})"

    def owner(self, key: str) -> str:
        """The node that owns ``key``: the first virtual node clockwise from its hash."""
        found = self._cache.get(key)
        if found is not None:
            return found
        if not self._owners:
            raise EmptyRing("the ring has no nodes")
        index = bisect.bisect(self._positions, _hash(key)) % len(self._positions)
        found = self._owners[index]
        if len(self._cache) >= 262_144:
            self._cache.clear()
        self._cache[key] = found
        return found

    def with_node(self, node: str) -> HashRing:
        return HashRing((*self.nodes, node), self.vnodes)

    def without_node(self, node: str) -> HashRing:
        return HashRing((n for n in self.nodes if n != node), self.vnodes)
