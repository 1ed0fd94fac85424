"""Failover bookkeeping with a hand-driven clock."""

from __future__ import annotations

from sentientedge.failover import FailoverTracker
from tests.helpers import FakeClock


def test_a_death_noticed_and_a_recovery_make_one_event():
    clock = FakeClock(100.0)
    tracker = FailoverTracker(clock)
    assert tracker.observe("shard-0", "shard", True, "e1") is None
    clock.now = 101.0
    assert tracker.observe("shard-0", "shard", False) is None
    assert tracker.recovering == ["shard-0"]
    clock.now = 102.5
    event = tracker.observe("shard-0", "shard", True, "e2")
    assert event is not None
    assert (event.detected_s, event.recovered_s) == (1.0, 2.5)
    assert tracker.recovering == [] and tracker.totals["shard"] == 1


def test_a_restart_between_two_probes_is_an_event_too():
    clock = FakeClock(100.0)
    tracker = FailoverTracker(clock)
    tracker.observe("ingress-0", "ingress", True, 1234)
    clock.now = 100.5
    event = tracker.observe("ingress-0", "ingress", True, 5678)
    assert event is not None and event.recovered_s == 0.5


def test_nothing_happens_while_all_is_well_or_before_the_first_answer():
    tracker = FailoverTracker(FakeClock(100.0))
    assert tracker.observe("shard-1", "shard", False) is None  # never seen up: not a failover
    assert tracker.recovering == []
    for _ in range(3):
        assert tracker.observe("shard-1", "shard", True, "e") is None
    assert tracker.summary()["failover_events_total"] == {}
