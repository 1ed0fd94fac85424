"""Keepalive for thousands of connections from one timer: a timer wheel and the ping policy.

Rules for this module:
- Pure: times are passed in (seconds, monotonic); no clock, no asyncio.
- A connection is in the wheel at its next deadline only; hearing from a client does not move
  it (that would cost a reschedule per frame): at the deadline the policy looks at when the
  client was last heard and either pings, closes, or sets the next deadline.
- A client that keeps sending is alive and is never pinged; a silent one is pinged after
  ``interval`` and closed when ``timeout`` passes with nothing heard.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from enum import Enum
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


class TimerWheel(Generic[T]):
    """Deadlines rounded up to ``tick`` seconds; adding, moving and removing are O(1)."""

    def __init__(self, tick: float) -> None:
        self.tick = tick
        self._slots: dict[int, set[T]] = {}
        self._slot_of: dict[T, int] = {}
        self._done = -1  # the last slot handed out by ``due``

    def schedule(self, item: T, at: float) -> None:
        slot = max(math.ceil(at / self.tick), self._done + 1)
        old = self._slot_of.get(item)
        if old == slot:
            return
        if old is not None:
            self._slots[old].discard(item)
        self._slots.setdefault(slot, set()).add(item)
        self._slot_of[item] = slot

    def cancel(self, item: T) -> None:
        slot = self._slot_of.pop(item, None)
        if slot is not None:
            bucket = self._slots.get(slot)
            if bucket is not None:
                bucket.discard(item)

    def due(self, now: float) -> list[T]:
        """Items whose deadline has come, each handed out once (schedule it again to keep it)."""
        last = math.floor(now / self.tick)
        out: list[T] = []
        if self._done < 0:
            self._done = min(self._slots, default=last + 1) - 1
        for slot in range(self._done + 1, last + 1):
            bucket = self._slots.pop(slot, None)
            if bucket:
                for item in bucket:
                    del self._slot_of[item]
                out.extend(bucket)
        self._done = max(self._done, last)
        return out

    def __len__(self) -> int:
        return len(self._slot_of)


class Action(Enum):
    WAIT = "wait"
    PING = "ping"
    CLOSE = "close"


def keepalive_step(
    now: float, last_heard: float, ping_sent: float | None, interval: float, timeout: float
) -> tuple[Action, float]:
    """At a connection's deadline: what to do, and its next deadline."""
    if ping_sent is not None and last_heard < ping_sent:
        if now - ping_sent >= timeout:
            return Action.CLOSE, now
        return Action.WAIT, ping_sent + timeout
    if now - last_heard >= interval:
        return Action.PING, now + timeout
    return Action.WAIT, last_heard + interval
