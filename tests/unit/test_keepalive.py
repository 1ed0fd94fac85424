"""One timer for every connection: the wheel and the ping policy, on a hand-moved clock."""

from __future__ import annotations

from sentientedge.keepalive import Action, TimerWheel, keepalive_step


def test_items_come_due_once_at_their_deadline():
    wheel: TimerWheel[str] = TimerWheel(0.5)
    wheel.schedule("a", 10.2)
    wheel.schedule("b", 11.0)
    wheel.schedule("c", 30.0)
    assert wheel.due(10.0) == []
    assert wheel.due(10.5) == ["a"]
    assert wheel.due(10.9) == []
    assert wheel.due(11.0) == ["b"]
    assert wheel.due(100.0) == ["c"]
    assert wheel.due(200.0) == [] and len(wheel) == 0


def test_moving_and_cancelling():
    wheel: TimerWheel[str] = TimerWheel(1.0)
    wheel.schedule("a", 5.0)
    wheel.schedule("a", 8.0)  # moved: due once, at the new time
    wheel.schedule("b", 6.0)
    wheel.cancel("b")
    assert wheel.due(7.0) == []
    assert wheel.due(8.0) == ["a"]


def test_a_deadline_in_the_past_comes_due_at_the_next_tick():
    wheel: TimerWheel[str] = TimerWheel(1.0)
    wheel.schedule("a", 3.0)
    assert wheel.due(5.0) == ["a"]
    wheel.schedule("late", 1.0)  # already past what was handed out
    assert wheel.due(6.0) == ["late"]


def test_many_items_in_one_slot():
    wheel: TimerWheel[int] = TimerWheel(1.0)
    for n in range(10_000):
        wheel.schedule(n, 2.0 + (n % 3) * 0.1)
    assert sorted(wheel.due(3.0)) == list(range(10_000))


def test_a_client_heard_recently_is_not_pinged():
    action, next_at = keepalive_step(
        now=100, last_heard=95, ping_sent=None, interval=20, timeout=20
    )
    assert (action, next_at) == (Action.WAIT, 115)


def test_a_silent_client_is_pinged_then_closed_without_a_pong():
    action, next_at = keepalive_step(
        now=120, last_heard=95, ping_sent=None, interval=20, timeout=20
    )
    assert (action, next_at) == (Action.PING, 140)
    assert keepalive_step(130, 95, 120, 20, 20) == (Action.WAIT, 140)
    assert keepalive_step(140, 95, 120, 20, 20)[0] is Action.CLOSE


def test_a_pong_or_any_frame_after_the_ping_keeps_the_client():
    action, next_at = keepalive_step(
        now=140, last_heard=121, ping_sent=120, interval=20, timeout=20
    )
    assert (action, next_at) == (Action.WAIT, 141)
