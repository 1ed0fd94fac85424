"""The scaling policy, driven by a fake clock: thresholds, cooldowns, bounds, manual requests."""

from __future__ import annotations

import pytest

from sentientedge.autoscale import (
    Autoscaler,
    CpuMeter,
    Direction,
    Load,
    ScalingDecision,
    ScalingPolicy,
    ScalingRefused,
)
from sentientedge.config import Config
from sentientedge.errors import ConfigError
from tests.helpers import FakeClock

POLICY = ScalingPolicy()  # the design's: 2..20, 0.8 / 0.3, 300 s / 600 s


def load(instances: int, cpu: float = 0.0, connections: int = 0) -> Load:
    return Load(instances, connections, 10_000, ingress_cpu=cpu, shard_cpu=cpu / 2)


def feed(scaler: Autoscaler, clock: FakeClock, instances: int, cpu: float, seconds: int) -> None:
    """One sample a second for ``seconds``."""
    for _ in range(seconds):
        clock.now += 1
        scaler.observe(load(instances, cpu), clock.now)


def run(scaler: Autoscaler, clock: FakeClock, instances: int, cpu: float, seconds: int) -> list:
    """A controller loop: sample and decide each second, applying every decision."""
    decisions: list[ScalingDecision] = []
    for _ in range(seconds):
        clock.now += 1
        scaler.observe(load(instances, cpu), clock.now)
        decision = scaler.decide(instances, clock.now)
        if decision is not None:
            decisions.append(decision)
            scaler.applied(decision)
            instances = decision.target
    return decisions


def test_utilisation_is_the_highest_ratio() -> None:
    assert Load(2, 18_000, 10_000, 0.2, 0.1).utilisation() == (0.9, "connections")
    assert Load(2, 100, 10_000, 0.85, 0.1).utilisation() == (0.85, "ingress_cpu")
    assert Load(2, 100, 10_000, 0.1, 0.95).utilisation() == (0.95, "shard_cpu")


def test_load_over_the_threshold_adds_one_instance_then_waits_out_the_cooldown() -> None:
    clock, scaler = FakeClock(), Autoscaler(POLICY)
    decisions = run(scaler, clock, 2, cpu=0.95, seconds=299)
    assert [(d.direction, d.instances, d.target) for d in decisions] == [(Direction.UP, 2, 3)]
    assert "ingress_cpu" in decisions[0].reason
    # Still hot: the next step comes only once 300 s have passed since the first.
    first = decisions[0].at
    more = run(scaler, clock, 3, cpu=0.95, seconds=int(first + 300 - clock.now) + 40)
    assert [(d.instances, d.target) for d in more] == [(3, 4)]
    assert more[0].at - first >= 300


def test_a_single_hot_sample_does_not_scale() -> None:
    clock, scaler = FakeClock(), Autoscaler(POLICY)
    feed(scaler, clock, 2, cpu=0.1, seconds=59)
    scaler.observe(load(2, cpu=1.0), clock.now + 1)
    assert scaler.decide(2, clock.now + 1) is None


def test_no_decision_before_half_a_window_of_samples() -> None:
    clock, scaler = FakeClock(), Autoscaler(POLICY)
    feed(scaler, clock, 2, cpu=1.0, seconds=30)  # spanning 29 s
    assert scaler.decide(2, clock.now) is None
    feed(scaler, clock, 2, cpu=1.0, seconds=1)
    assert scaler.decide(2, clock.now) is not None


def test_low_load_removes_one_instance_only_after_the_down_cooldown() -> None:
    clock, scaler = FakeClock(), Autoscaler(POLICY)
    up = run(scaler, clock, 4, cpu=0.95, seconds=40)
    assert [(d.instances, d.target) for d in up] == [(4, 5)]
    quiet = run(scaler, clock, 5, cpu=0.1, seconds=int(up[0].at + 599 - clock.now))
    assert quiet == []  # within 600 s of the scale-up
    quiet = run(scaler, clock, 5, cpu=0.1, seconds=60)
    assert [(d.direction, d.target) for d in quiet] == [(Direction.DOWN, 4)]
    assert quiet[0].at - up[0].at >= 600


def test_never_outside_the_bounds() -> None:
    clock = FakeClock()
    small = ScalingPolicy(min_instances=2, max_instances=3, up_cooldown_s=10, down_cooldown_s=10)
    scaler = Autoscaler(small)
    assert [d.target for d in run(scaler, clock, 2, cpu=1.0, seconds=300)] == [3]
    assert [d.target for d in run(scaler, clock, 3, cpu=0.0, seconds=300)] == [2]
    # A shape started below the minimum is left alone while idle, and grows only when loaded.
    assert run(Autoscaler(small), clock, 1, cpu=0.0, seconds=300) == []


def test_load_between_the_thresholds_changes_nothing() -> None:
    assert run(Autoscaler(POLICY), FakeClock(), 5, cpu=0.5, seconds=2000) == []


def test_manual_requests_are_bounded_and_start_the_cooldowns() -> None:
    clock, scaler = FakeClock(), Autoscaler(POLICY)
    decision = scaler.request(2, 3, clock.now)
    assert (decision.direction, decision.target, decision.manual) == (Direction.UP, 5, True)
    scaler.applied(decision)
    assert run(scaler, clock, 5, cpu=0.95, seconds=200) == []  # inside the up cooldown
    with pytest.raises(ScalingRefused, match="outside"):
        scaler.request(5, 16, clock.now)
    with pytest.raises(ScalingRefused, match="outside"):
        scaler.request(2, -1, clock.now)
    with pytest.raises(ScalingRefused):
        scaler.request(2, 0, clock.now)


def test_config_reads_the_design_names() -> None:
    config = Config.from_env(
        {
            "MIN_INSTANCES": "3",
            "MAX_INSTANCES": "7",
            "SCALE_UP_THRESHOLD": "0.9",
            "SCALE_DOWN_THRESHOLD": "0.2",
            "SCALE_UP_COOLDOWN": "1000",
            "SCALE_DOWN_COOLDOWN": "2000",
        }
    )
    assert config.scaling_policy == ScalingPolicy(3, 7, 0.9, 0.2, 1.0, 2.0)
    assert Config().scaling_policy == POLICY
    with pytest.raises(ConfigError, match="MIN_INSTANCES"):
        Config.from_env({"MIN_INSTANCES": "5", "MAX_INSTANCES": "4"})
    with pytest.raises(ConfigError, match="SCALE_DOWN_THRESHOLD"):
        Config.from_env({"SCALE_DOWN_THRESHOLD": "0.9"})


def test_cpu_meter_rates_per_process_and_restarts_anew() -> None:
    meter = CpuMeter()
    assert meter.rate("ingress-0", 10, 5.0, 100.0) is None
    assert meter.rate("ingress-0", 10, 6.5, 102.0) == pytest.approx(0.75)
    assert meter.rate("ingress-0", 11, 0.2, 104.0) is None  # a new process
    assert meter.rate("ingress-0", 11, 0.7, 105.0) == pytest.approx(0.5)
