"""Topic grammar, wildcard matching and subscription tables (PROTOCOL.md, "Topics").

Rules for this module:
- A topic is 1 to 8 levels separated by ``/``, each 1 to 64 characters of
  ``[A-Za-z0-9_.:-]``. The first level may start with ``$``: those topics are the server's own.
- Filters may hold ``+`` (one whole level) and ``#`` (the last level, any number of levels,
  the parent included), as in MQTT 3.1.1 section 4.7.
- As in MQTT 4.7.2, a filter starting with a wildcard does not match a ``$`` topic.
- Everything here is pure and cached; the hot path calls it once per message.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from functools import lru_cache
from typing import Generic, TypeVar

from sentientedge.errors import BadTopic

MAX_LEVELS = 8
MAX_LEVEL_CHARS = 64
SINGLE = "+"
MULTI = "#"

_LEVEL = re.compile(r"[A-Za-z0-9_.:\-]{1,64}\Z")
_FIRST_LEVEL = re.compile(r"(?=.{1,64}\Z)\$?[A-Za-z0-9_.:\-]+\Z")


@lru_cache(maxsize=65_536)
def validate_topic(topic: str) -> tuple[str, ...]:
    """Return the levels of a publishable topic name, or raise :class:`BadTopic`."""
    levels = _split(topic)
    for index, level in enumerate(levels):
        if level in (SINGLE, MULTI):
            raise BadTopic(f"wildcard {level!r} not allowed in a topic name")
        _check_level(level, index)
    return levels


@lru_cache(maxsize=16_384)
def validate_filter(topic_filter: str) -> tuple[str, ...]:
    """Return the levels of a subscription filter, or raise :class:`BadTopic`."""
    levels = _split(topic_filter)
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if level == SINGLE:
            continue
        if level == MULTI:
            if index != last:
                raise BadTopic("'#' must be the last level")
            continue
        _check_level(level, index)
    return levels


def _split(text: object) -> tuple[str, ...]:
    if not isinstance(text, str):
        raise BadTopic("topic must be a string")
    levels = tuple(text.split("/"))
    if len(levels) > MAX_LEVELS:
        raise BadTopic(f"more than {MAX_LEVELS} levels")
    return levels


def _check_level(level: str, index: int) -> None:
    pattern = _FIRST_LEVEL if index == 0 else _LEVEL
    if not pattern.match(level):
        if not level:
            raise BadTopic("empty level")
        if len(level) > MAX_LEVEL_CHARS:
            raise BadTopic(f"level longer than {MAX_LEVEL_CHARS} characters")
        raise BadTopic(f"level {level[:20]!r} has characters outside [A-Za-z0-9_.:-]")


def is_server_topic(topic: str) -> bool:
    return topic.startswith("$")


def has_wildcard(topic_filter: str) -> bool:
    return SINGLE in topic_filter or MULTI in topic_filter


def matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic_filter`` matches the topic name ``topic``."""
    return _levels_match(validate_filter(topic_filter), validate_topic(topic))


def _levels_match(pattern: tuple[str, ...], levels: tuple[str, ...]) -> bool:
    if levels and levels[0].startswith("$") and pattern and pattern[0] in (SINGLE, MULTI):
        return False
    for index, part in enumerate(pattern):
        if part == MULTI:
            return True
        if index >= len(levels):
            return False
        if part != SINGLE and part != levels[index]:
            return False
    return len(pattern) == len(levels)


def covers(pattern: str, topic_filter: str) -> bool:
    """Whether every topic that ``topic_filter`` matches is also matched by ``pattern``.

    Used for subscribe permissions: ``drone/#`` covers ``drone/+/telemetry``, ``+/x`` does not
    cover ``#``.
    """
    outer = validate_filter(pattern)
    inner = validate_filter(topic_filter)
    if outer[0] in (SINGLE, MULTI) and inner[0].startswith("$"):
        return False
    for index, part in enumerate(outer):
        if part == MULTI:
            return True
        if index >= len(inner):
            return False
        sub = inner[index]
        if sub == MULTI:
            # Only "+/#" covers a leading "#": every topic has a first level, then any more.
            return index == 0 and part == SINGLE and outer[1:] == (MULTI,)
        if part == SINGLE:
            continue
        if sub == SINGLE or sub != part:
            return False
    return len(outer) == len(inner)


def placement_key(topic: str) -> str:
    """The key that places a topic on the hash ring.

    All of one drone's topics (``drone/{id}/...``) share the key ``drone/{id}``, so they live on
    the shard that also hosts that drone's virtual actor: its telemetry, commands and status are
    handled in one process without another hop.
    """
    if topic.startswith("drone/"):
        end = topic.find("/", 6)
        return topic if end < 0 else topic[:end]
    return topic


H = TypeVar("H", bound=Hashable)


class _Node:
    __slots__ = ("children", "holders")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.holders: set = set()


class TopicTrie(Generic[H]):
    """Filters and who holds them; ``match(topic)`` returns every holder of a matching filter."""

    def __init__(self, cache_size: int = 65_536) -> None:
        self._root = _Node()
        self._filters: dict[str, set[H]] = {}
        self._cache: dict[str, frozenset[H]] = {}
        self._cache_size = cache_size

    def __len__(self) -> int:
        return len(self._filters)

    def __contains__(self, topic_filter: object) -> bool:
        return topic_filter in self._filters

    def add(self, topic_filter: str, holder: H) -> bool:
        """Add ``holder`` to ``topic_filter``; True when the filter had no holder before."""
        holders = self._filters.get(topic_filter)
        if holders is not None and holder in holders:
            return False
        node = self._root
        for level in validate_filter(topic_filter):
            node = node.children.setdefault(level, _Node())
        node.holders.add(holder)
        first = holders is None
        if first:
            holders = self._filters[topic_filter] = set()
        assert holders is not None
        holders.add(holder)
        self._cache.clear()
        return first

    def remove(self, topic_filter: str, holder: H) -> bool:
        """Remove ``holder`` from ``topic_filter``; True when the filter has no holder left."""
        holders = self._filters.get(topic_filter)
        if holders is None or holder not in holders:
            return False
        holders.discard(holder)
        path = [self._root]
        for level in validate_filter(topic_filter):
            path.append(path[-1].children[level])
        path[-1].holders.discard(holder)
        for parent, level, node in zip(
            reversed(path[:-1]),
            reversed(validate_filter(topic_filter)),
            reversed(path[1:]),
            strict=True,
        ):
            if node.holders or node.children:
                break
            del parent.children[level]
        self._cache.clear()
        if holders:
            return False
        del self._filters[topic_filter]
        return True

    def holders(self) -> list[tuple[str, H]]:
        """Every (filter, holder) pair."""
        return [(f, holder) for f, hs in self._filters.items() for holder in hs]

    def remove_holder(self, holder: H) -> list[str]:
        """Remove ``holder`` from every filter; return the filters left without holders."""
        emptied = []
        for topic_filter in [f for f, hs in self._filters.items() if holder in hs]:
            if self.remove(topic_filter, holder):
                emptied.append(topic_filter)
        return emptied

    def match(self, topic: str) -> frozenset[H]:
        found = self._cache.get(topic)
        if found is not None:
            return found
        levels = validate_topic(topic)
        result: set[H] = set()
        self._collect(self._root, levels, 0, result)
        found = frozenset(result)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[topic] = found
        return found

    def _collect(self, node: _Node, levels: tuple[str, ...], index: int, out: set[H]) -> None:
        server_topic = index == 0 and levels[0].startswith("$")
        if not server_topic:
            multi = node.children.get(MULTI)
            if multi is not None:
                out.update(multi.holders)
        if index == len(levels):
            out.update(node.holders)
            return
        exact = node.children.get(levels[index])
        if exact is not None:
            self._collect(exact, levels, index + 1, out)
        if not server_topic:
            single = node.children.get(SINGLE)
            if single is not None:
                self._collect(single, levels, index + 1, out)
