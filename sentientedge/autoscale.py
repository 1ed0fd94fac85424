"""When to add or remove router instances: a pure policy, fed samples, deciding with a clock.

An instance is one ingress actor and one topic-shard actor (PROTOCOL.md, "HTTP endpoints").
Utilisation is the highest of three ratios, each 0..1 (README, "Scaling"):

- open connections / (instances x ``MAX_WS_CONNECTIONS``),
- the busiest ingress process's CPU (seconds of CPU per second),
- the busiest shard process's CPU.

Rules for this module:
- No Ray, no clock of its own: the controller passes ``now`` (seconds, monotonic) in, so the
  tests drive it with a fake clock.
- One step at a time: up by one when the mean utilisation over the window is above
  ``SCALE_UP_THRESHOLD``, down by one when it is below ``SCALE_DOWN_THRESHOLD``; never outside
  ``MIN_INSTANCES``..``MAX_INSTANCES`` (a shape started outside them, e.g. one instance on a
  laptop, is left alone until the load moves it, and then only towards them). After a
  scale-up, no other scale-up for ``SCALE_UP_COOLDOWN``; after any scaling, no scale-down
  for ``SCALE_DOWN_COOLDOWN`` (a fleet that just grew is not shrunk by the lull before its
  load arrives).
- A manual request (the admin endpoints) counts as a scaling for the cooldowns.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

# Samples older than this are forgotten: a decision rests on the last minute, not one probe
# (``SCALE_WINDOW``), and waits for half a window of them.
WINDOW_S = 60.0


class Direction(str, Enum):
    UP = "up"
    DOWN = "down"


class ScalingRefused(Exception):
    """A requested target the policy does not allow (answered 409)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ScalingPolicy:
    min_instances: int = 2
    max_instances: int = 20
    up_threshold: float = 0.8
    down_threshold: float = 0.3
    up_cooldown_s: float = 300.0
    down_cooldown_s: float = 600.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_instances <= self.max_instances:
            raise ValueError("need 1 <= MIN_INSTANCES <= MAX_INSTANCES")
        if not 0 <= self.down_threshold < self.up_threshold:
            raise ValueError("need 0 <= SCALE_DOWN_THRESHOLD < SCALE_UP_THRESHOLD")


@dataclass(frozen=True)
class Load:
    """One sample of the router's load."""

    instances: int
    connections: int
    max_connections_per_instance: int
    ingress_cpu: float  # the busiest ingress process, CPU seconds per second
    shard_cpu: float  # the busiest shard process

    def utilisation(self) -> tuple[float, str]:
        """The highest ratio and what it measures."""
        capacity = max(1, self.instances * self.max_connections_per_instance)
        ratios = {
            "connections": self.connections / capacity,
            "ingress_cpu": self.ingress_cpu,
            "shard_cpu": self.shard_cpu,
        }
        what = max(ratios, key=lambda name: ratios[name])
        return ratios[what], what


@dataclass(frozen=True)
class ScalingDecision:
    direction: Direction
    instances: int  # before
    target: int  # after
    reason: str
    at: float  # the clock's time of the decision
    manual: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "direction": self.direction.value,
            "instances": self.instances,
            "target": self.target,
            "reason": self.reason,
            "manual": self.manual,
        }


class Autoscaler:
    """Samples in, at most one decision out per call of :meth:`decide`."""

    def __init__(self, policy: ScalingPolicy, window_s: float = WINDOW_S) -> None:
        self.policy = policy
        self.window_s = window_s
        self._samples: deque[tuple[float, float, str]] = deque()  # (at, utilisation, what)
        self.last_up: float | None = None
        self.last_scaling: float | None = None

    def observe(self, load: Load, now: float) -> None:
        value, what = load.utilisation()
        self._samples.append((now, value, what))
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()

    def utilisation(self) -> tuple[float, str]:
        """The mean over the window, and what drove its highest sample."""
        if not self._samples:
            return 0.0, "no samples"
        mean = sum(value for _, value, _ in self._samples) / len(self._samples)
        return mean, max(self._samples, key=lambda sample: sample[1])[2]

    def decide(self, instances: int, now: float) -> ScalingDecision | None:
        """The step to take now, or None. The caller applies it, then :meth:`applied`."""
        policy = self.policy
        if not self._samples or now - self._samples[0][0] < self.window_s / 2:
            return None  # not enough history yet: half a window at least
        value, what = self.utilisation()
        if value > policy.up_threshold and instances < policy.max_instances:
            if self.last_up is not None and now - self.last_up < policy.up_cooldown_s:
                return None
            reason = f"utilisation {value:.2f} > {policy.up_threshold} ({what})"
            return ScalingDecision(Direction.UP, instances, instances + 1, reason, now)
        if value < policy.down_threshold and instances > policy.min_instances:
            if self.last_scaling is not None and now - self.last_scaling < policy.down_cooldown_s:
                return None
            reason = f"utilisation {value:.2f} < {policy.down_threshold} ({what})"
            return ScalingDecision(Direction.DOWN, instances, instances - 1, reason, now)
        return None

    def request(self, instances: int, change: int, now: float) -> ScalingDecision:
        """A manual step of ``change`` instances (positive: up); :class:`ScalingRefused` when
        the target is outside the bounds."""
        if change == 0:
            raise ScalingRefused("instances must not be 0")
        target = instances + change
        policy = self.policy
        if not policy.min_instances <= target <= policy.max_instances:
            raise ScalingRefused(
                f"target {target} outside MIN_INSTANCES..MAX_INSTANCES "
                f"({policy.min_instances}..{policy.max_instances})"
            )
        direction = Direction.UP if change > 0 else Direction.DOWN
        reason = f"requested: {'+' if change > 0 else ''}{change}"
        return ScalingDecision(direction, instances, target, reason, now, manual=True)

    def applied(self, decision: ScalingDecision) -> None:
        """``decision`` was carried out: the cooldowns start from it, the window anew (its
        samples measured the old shape)."""
        if decision.direction is Direction.UP:
            self.last_up = decision.at
        self.last_scaling = decision.at
        self._samples.clear()


class CpuMeter:
    """CPU seconds per second of each process, from the cumulative ``cpu_s`` they report."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, float, float]] = {}  # name -> (pid, cpu_s, at)

    def rate(self, name: str, pid: int, cpu_s: float, now: float) -> float | None:
        """None for the first report of a process (or of its restart): nothing to compare."""
        last = self._last.get(name)
        self._last[name] = (pid, cpu_s, now)
        if last is None or last[0] != pid or now <= last[2]:
            return None
        return max(0.0, (cpu_s - last[1]) / (now - last[2]))

    def forget(self, keep: set[str]) -> None:
        for name in set(self._last) - keep:
            del self._last[name]
