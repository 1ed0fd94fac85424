"""Failover bookkeeping: which parts of the router died, when that was noticed, when they served
again. Pure; the controller feeds it the outcome of its probes.

Rules for this module:
- An actor is probed every ``PROBE_INTERVAL_S``; each answer carries its incarnation (a value
  that changes when its process is replaced). A failed probe, or a new incarnation, is a failure.
- An event is complete when the actor answers again: ``detected_s`` is how long the failure went
  unnoticed (from the last good answer), ``recovered_s`` how long until it served again.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

PROBE_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class FailoverEvent:
    actor: str
    kind: str  # ingress, shard, node
    last_ok_at: float
    noticed_at: float
    serving_at: float

    @property
    def detected_s(self) -> float:
        return max(0.0, self.noticed_at - self.last_ok_at)

    @property
    def recovered_s(self) -> float:
        return max(0.0, self.serving_at - self.last_ok_at)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "detected_s": self.detected_s, "recovered_s": self.recovered_s}


@dataclass
class _Watch:
    kind: str
    incarnation: Any = None
    last_ok_at: float | None = None
    down_since: float | None = None  # when the failure was noticed


@dataclass
class FailoverTracker:
    clock: Callable[[], float] = time.time
    events: deque[FailoverEvent] = field(default_factory=lambda: deque(maxlen=1000))
    totals: Counter[str] = field(default_factory=Counter)
    _watches: dict[str, _Watch] = field(default_factory=dict)

    def observe(
        self, actor: str, kind: str, ok: bool, incarnation: Any = None
    ) -> FailoverEvent | None:
        """Record one probe; returns the event that this answer completes, if any."""
        now = self.clock()
        watch = self._watches.setdefault(actor, _Watch(kind))
        if not ok:
            if watch.down_since is None and watch.last_ok_at is not None:
                watch.down_since = now
            return None
        event = None
        restarted = watch.incarnation is not None and incarnation != watch.incarnation
        if watch.last_ok_at is not None and (watch.down_since is not None or restarted):
            event = FailoverEvent(
                actor=actor,
                kind=kind,
                last_ok_at=watch.last_ok_at,
                noticed_at=watch.down_since if watch.down_since is not None else now,
                serving_at=now,
            )
            self.events.append(event)
            self.totals[kind] += 1
        watch.incarnation = incarnation
        watch.last_ok_at = now
        watch.down_since = None
        return event

    def forget(self, actor: str) -> None:
        """``actor`` was stopped on purpose (its node left, the router shrank): not a failure
        still waiting to recover."""
        self._watches.pop(actor, None)

    @property
    def recovering(self) -> list[str]:
        return sorted(name for name, w in self._watches.items() if w.down_since is not None)

    def summary(self) -> dict[str, Any]:
        return {
            "recovering": self.recovering,
            "failover_events_total": dict(self.totals),
            "events": [e.as_dict() for e in list(self.events)[-50:]],
        }
