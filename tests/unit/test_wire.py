"""Frames between router processes and the bookkeeping that survives reconnects (no sockets)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentientedge import wire
from sentientedge.wire import FrameReader, LinkState, WireError


def _keep(item: tuple) -> bool:
    return item[0] != "p"


def test_frames_come_out_whole_whatever_the_split():
    frames = [(1, 0, (("p", "drone/1/telemetry", b"\x81\xa2op\xa3msg"),)), (2, 1, ()), ("x",)]
    stream = b"".join(wire.encode(frame) for frame in frames)
    for chunk in (1, 2, 3, 7, len(stream)):
        reader = FrameReader()
        out = []
        for start in range(0, len(stream), chunk):
            out.extend(reader.feed(stream[start : start + chunk]))
        assert out == frames
        assert reader.buffered == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_any_split_of_a_stream_gives_the_same_frames(cuts):
    frames = [(n, n - 1, (("s", n, "x" * n),)) for n in range(1, 20)]
    stream = b"".join(wire.encode(frame) for frame in frames)
    reader = FrameReader()
    out, start = [], 0
    for cut in cuts:
        out.extend(reader.feed(stream[start : start + cut]))
        start += cut
    out.extend(reader.feed(stream[start:]))
    assert out == frames


def test_a_length_beyond_the_bound_is_refused():
    reader = FrameReader(max_frame_bytes=100)
    with pytest.raises(WireError, match="more than 100"):
        reader.feed((101).to_bytes(4, "big") + b"x" * 10)


def test_an_undecodable_frame_is_refused():
    with pytest.raises(WireError, match="undecodable"):
        FrameReader().feed((1).to_bytes(4, "big") + b"\xc1")


def test_batches_are_recognised_by_shape():
    assert wire.is_batch((3, 1, ()))
    assert not wire.is_batch(("hello", 1, ()))
    assert not wire.is_batch((3, 1))


def test_proofs_need_the_key_and_bind_name_and_epoch():
    key = wire.link_key("a-long-enough-secret")
    nonce = b"n" * 16
    good = wire.proof(key, nonce, "ingress-0", "e1")
    assert wire.proof_ok(key, nonce, "ingress-0", "e1", good)
    assert not wire.proof_ok(key, nonce, "ingress-1", "e1", good)
    assert not wire.proof_ok(key, nonce, "ingress-0", "e2", good)
    assert not wire.proof_ok(wire.link_key("another-secret-here"), nonce, "ingress-0", "e1", good)
    assert not wire.proof_ok(key, nonce, "ingress-0", "e1", "not bytes")


def test_only_kept_items_wait_for_their_ack():
    state = LinkState(_keep)
    assert state.number([("p", "t", b"m"), ("s", 1, "f")]) == 1
    assert state.number([("p", "t", b"m")]) == 2
    assert state.number([("d", "x")]) == 3
    assert [seq for seq, _ in state.unacked] == [1, 3]
    state.acked(2)
    assert list(state.unacked) == [(3, [("d", "x")])]


def test_a_batch_is_handled_once_per_process():
    state = LinkState(_keep)
    assert state.accept(1) and state.accept(2)
    assert not state.accept(2) and not state.accept(1)
    assert state.owes_ack


def test_the_same_peer_process_gets_again_only_what_it_did_not_handle():
    state = LinkState(_keep)
    state.reconnected("peer-1", 0)
    state.number([("s", 1, "a")])
    state.number([("s", 2, "b"), ("p", "t", b"qos0")])
    state.number([("s", 3, "c")])
    restarted, again = state.reconnected("peer-1", 2)
    assert not restarted
    assert again == [("s", 3, "c")]


def test_a_restarted_peer_gets_every_kept_item_and_unanswered_request_in_order():
    state = LinkState(_keep)
    state.reconnected("peer-1", 0)
    for request_id in (11, 12):
        state.pending[request_id] = ("q", request_id, "topic", b"frame")
    state.number([("q", 11, "topic", b"frame"), ("p", "t", b"qos0")])
    state.number([("q", 12, "topic", b"frame"), ("s", 5, "f")])
    state.acked(2)  # both handled by the old process ...
    state.answered(12)  # ... which answered one before it died
    state.number([("d", "conn-1")])
    restarted, again = state.reconnected("peer-2", 0)
    assert restarted
    assert again == [("q", 11, "topic", b"frame"), ("d", "conn-1")]
    assert state.received == 0 and state.peer_epoch == "peer-2"


def test_requests_handled_survive_a_reconnect_to_the_same_process_then_its_death():
    state = LinkState(_keep)
    state.reconnected("peer-1", 0)
    state.pending[7] = ("q", 7, "t", b"f")
    state.number([("q", 7, "t", b"f")])
    state.acked(1)
    assert state.reconnected("peer-1", 1) == (False, [])  # its reply will come from it
    assert state.reconnected("peer-2", 0) == (True, [("q", 7, "t", b"f")])  # it died first


def test_forgetting_a_peer_returns_the_requests_that_get_no_answer():
    state = LinkState(_keep)
    state.pending[1] = ("q", 1, "t", b"f")
    state.number([("q", 1, "t", b"f"), ("d", "c")])
    assert state.forget() == [("q", 1, "t", b"f")]
    assert not state.unacked and not state.pending


def test_a_batch_frame_is_msgpack_of_seq_ack_items():
    encoded = wire.encode((5, 4, (("p", "t", b"m"),)))
    assert int.from_bytes(encoded[:4], "big") == len(encoded) - 4
    assert msgpack.unpackb(encoded[4:], use_list=False) == (5, 4, (("p", "t", b"m"),))
