"""Rate limits with a hand-driven clock: no sleeping."""

from __future__ import annotations

from sentientedge.ratelimit import AddressLimiter, BadFrameGuard, RateGuard, TokenBucket, Verdict
from tests.helpers import FakeClock


def test_bucket_allows_burst_then_rate():
    clock = FakeClock()
    bucket = TokenBucket(rate=100, burst=200, clock=clock)
    assert sum(bucket.take() for _ in range(300)) == 200
    clock.now += 0.5
    assert sum(bucket.take() for _ in range(300)) == 50


def test_drone_at_fifty_hz_is_never_limited():
    clock = FakeClock()
    guard = RateGuard.for_drone(100, clock)
    for _ in range(50 * 60):
        assert guard.check() is Verdict.PASS
        clock.now += 0.02


def test_over_the_limit_drops_and_tells_at_most_once_a_second():
    clock = FakeClock()
    guard = RateGuard.for_drone(100, clock)
    verdicts = [guard.check() for _ in range(400)]
    assert verdicts.count(Verdict.PASS) == 200
    assert verdicts.count(Verdict.DROP_AND_TELL) == 1
    assert verdicts.count(Verdict.DROP) == 199


def test_far_over_the_limit_closes():
    clock = FakeClock()
    guard = RateGuard.for_drone(100, clock)
    verdicts = []
    for _ in range(10 * 400):  # 400 msgs/s for 10 s against a 100 Hz limit
        verdicts.append(guard.check())
        clock.now += 1 / 400
    assert Verdict.CLOSE in verdicts


def test_twice_the_rate_briefly_does_not_close():
    clock = FakeClock()
    guard = RateGuard.for_drone(100, clock)
    verdicts = []
    for _ in range(400):  # 200 msgs/s for 2 s
        verdicts.append(guard.check())
        clock.now += 1 / 200
    assert Verdict.CLOSE not in verdicts


def test_person_limit_is_per_minute():
    clock = FakeClock()
    guard = RateGuard.for_person(100, clock)
    assert sum(guard.check() is Verdict.PASS for _ in range(150)) == 100
    clock.now += 30
    assert sum(guard.check() is Verdict.PASS for _ in range(150)) == 50


def test_bad_frames_over_a_hundred_a_minute():
    clock = FakeClock()
    guard = BadFrameGuard(clock=clock)
    assert not any(guard.record() for _ in range(100))
    assert guard.record()
    clock.now += 61
    assert not guard.record()


def test_bytes_per_second_bound_a_connection_as_well_as_messages():
    clock = FakeClock()
    guard = RateGuard.for_drone(100, clock, bytes_per_s=100_000)
    # 10 frames a second (well within 100 Hz) of 60 KB: 600 KB/s, six times the byte rate.
    verdicts = []
    for _ in range(50):
        verdicts.append(guard.check(60_000))
        clock.now += 0.1
    passed = verdicts.count(Verdict.PASS)
    assert 3 <= passed <= 3 + 5 * 100_000 / 60_000 + 1  # the 2 s burst, then 100 KB/s
    assert Verdict.DROP_AND_TELL in verdicts
    small = RateGuard.for_drone(100, clock, bytes_per_s=100_000)
    for _ in range(500):  # 50 Hz telemetry of 500 bytes: never limited
        assert small.check(500) is Verdict.PASS
        clock.now += 0.02


def test_handshakes_are_limited_per_address():
    clock = FakeClock()
    limiter = AddressLimiter(rate=2, burst=4, clock=clock, max_addresses=3)
    assert [limiter.allow("10.0.0.1") for _ in range(6)] == [True] * 4 + [False] * 2
    assert limiter.allow("10.0.0.2")  # another address has its own bucket
    clock.now += 0.5
    assert limiter.allow("10.0.0.1") and not limiter.allow("10.0.0.1")
    assert limiter.retry_after() == 1
    for n in range(3, 10):  # bounded memory: old addresses are forgotten
        limiter.allow(f"10.0.0.{n}")
    assert len(limiter._buckets) == 3
