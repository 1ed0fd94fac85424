"""QoS 1 delivery to a session: order, window, gaps and resume, without I/O."""

from __future__ import annotations

from sentientedge.delivery import Fetch, SessionDelivery


def frame(seq: int) -> bytes:
    return f"m{seq}".encode()


def test_in_order_messages_go_out_at_once():
    d = SessionDelivery(acked=0, window=10)
    for seq in (1, 2, 3):
        d.offer(seq, frame(seq))
    assert [s for s, _, _ in d.take_ready()] == [1, 2, 3]
    assert d.unacked == 3


def test_out_of_order_waits_for_the_gap_then_fetches_it():
    d = SessionDelivery(acked=0, window=10)
    d.offer(2, frame(2))
    assert d.take_ready() == []
    assert d.fetch_needed() == Fetch(1, 2)
    assert d.fetch_needed() is None  # one fetch at a time
    d.fetched([(1, frame(1)), (2, frame(2))])
    assert [s for s, _, _ in d.take_ready()] == [1, 2]


def test_the_window_holds_back_and_acks_open_it():
    d = SessionDelivery(acked=0, window=2)
    for seq in range(1, 6):
        d.offer(seq, frame(seq))
    assert [s for s, _, _ in d.take_ready()] == [1, 2]
    assert d.fetch_needed() is None  # window closed
    assert d.ack(2)
    assert d.take_ready() == []  # 3-5 were not kept in memory
    assert d.fetch_needed() == Fetch(3, 2)
    d.fetched([(3, frame(3)), (4, frame(4))])
    assert [s for s, _, _ in d.take_ready()] == [3, 4]


def test_acks_beyond_what_was_sent_are_clamped():
    d = SessionDelivery(acked=0, window=10)
    d.offer(1, frame(1))
    d.take_ready()
    assert d.ack(99)
    assert d.acked == 1


def test_resume_redelivers_with_dup_and_new_ones_without():
    d = SessionDelivery.resumed(acked=3, last_seq=5, window=10)
    assert d.fetch_needed() == Fetch(4, 2)
    d.fetched([(4, frame(4)), (5, frame(5))])
    d.offer(6, frame(6))
    assert [(s, dup) for s, _, dup in d.take_ready()] == [(4, True), (5, True), (6, False)]


def test_an_empty_fetch_skips_what_no_longer_exists():
    d = SessionDelivery.resumed(acked=0, last_seq=4, window=10)
    d.fetch_needed()
    d.fetched([(3, frame(3)), (4, frame(4))])  # 1 and 2 were acked elsewhere
    assert [s for s, _, _ in d.take_ready()] == [3, 4]
    d2 = SessionDelivery.resumed(acked=0, last_seq=4, window=10)
    d2.fetch_needed()
    d2.fetched([])
    assert d2.fetch_needed() is None and d2.next_seq == 5


def test_duplicates_of_sent_messages_are_ignored():
    d = SessionDelivery(acked=0, window=10)
    d.offer(1, frame(1))
    d.take_ready()
    d.offer(1, frame(1))
    assert d.take_ready() == []


def test_an_ack_for_what_the_old_connection_had_counts_before_it_is_redelivered():
    d = SessionDelivery.resumed(acked=10, last_seq=50, window=100)
    assert d.ack(50)  # the client had them all from the old connection
    assert d.fetch_needed() is None and d.take_ready() == []
    d.offer(51, frame(51))
    assert [s for s, _, _ in d.take_ready()] == [51]


def test_learning_of_a_stored_message_fetches_it():
    d = SessionDelivery(acked=0, window=10)
    d.learn_last(2)  # stored, its live copy lost
    assert d.fetch_needed() == Fetch(1, 2)


def test_passed_over_messages_hold_neither_the_window_nor_earlier_acks():
    d = SessionDelivery.resumed(acked=0, last_seq=0, window=3)
    for seq in range(1, 4):
        d.offer(seq, frame(seq))
    ready = d.take_ready()
    assert [s for s, _, _ in ready] == [1, 2, 3]
    d.pass_over(2)  # not readable any more: not sent
    assert d.acked == 0  # 1 was sent and is not acked: 2 waits behind it
    d.ack(1)
    assert d.acked == 2  # 1 acked by the client, 2 with it
    d.pass_over(3)
    assert d.acked == 3 and d.window_open
    # A long tail of unreadable messages never fills the window.
    for seq in range(4, 20):
        d.offer(seq, frame(seq))
        for s, _, _ in d.take_ready():
            d.pass_over(s)
    assert d.acked == 19 and d.unacked == 0
