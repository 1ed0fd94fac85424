"""Frames of an open WebSocket, checked against websockets' own serializer and parser."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from sentientedge import wsframes
from sentientedge.wsframes import FrameReader, Violation


def client(opcode: Opcode, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame, as websockets writes it."""
    return Frame(opcode, payload, fin=fin).serialize(mask=True, extensions=[])


def test_messages_of_every_length_come_out_whole_and_unmasked():
    reader = FrameReader(max_size=1 << 20)
    for size in (0, 1, 125, 126, 127, 65535, 65536, 70_000):
        payload = os.urandom(size)
        assert reader.feed(client(Opcode.BINARY, payload)) == [(wsframes.BINARY, payload)]
    assert reader.feed(client(Opcode.TEXT, "héllo".encode())) == [(wsframes.TEXT, "héllo".encode())]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=8), st.data())
def test_any_split_gives_the_same_messages(payloads, data):
    stream = b"".join(client(Opcode.BINARY, p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = FrameReader(max_size=1 << 20)
    out, start = [], 0
    for cut in [*cuts, len(stream)]:
        out.extend(reader.feed(stream[start:cut]))
        start = cut
    assert out == [(wsframes.BINARY, p) for p in payloads]
    assert reader.buffered == 0


def test_fragments_are_joined_and_control_frames_pass_between_them():
    reader = FrameReader(max_size=1000)
    stream = (
        client(Opcode.TEXT, b"hel", fin=False)
        + client(Opcode.PING, b"p")
        + client(Opcode.CONT, b"lo ", fin=False)
        + client(Opcode.CONT, b"you", fin=True)
    )
    assert reader.feed(stream) == [(wsframes.PING, b"p"), (wsframes.TEXT, b"hello you")]


@pytest.mark.parametrize(
    "stream, code",
    [
        (Frame(Opcode.BINARY, b"x").serialize(mask=False, extensions=[]), 1002),  # unmasked
        (bytes([0x82 | 0x40, 0x81]) + b"\0\0\0\0x", 1002),  # a reserved bit
        (bytes([0x83, 0x80]) + b"\0\0\0\0", 1002),  # opcode 3 is reserved
        (client(Opcode.CONT, b"x"), 1002),  # nothing to continue
        (client(Opcode.TEXT, b"a", fin=False) + client(Opcode.TEXT, b"b"), 1002),
        (bytes([0x09, 0x81]) + b"\0\0\0\0p", 1002),  # a ping without fin
        (bytes([0x89, 0x80 | 126, 0, 126]) + b"\0\0\0\0" + b"x" * 126, 1002),  # long ping
        (client(Opcode.BINARY, b"x" * 101), 1009),
        (client(Opcode.BINARY, b"x" * 60, fin=False) + client(Opcode.CONT, b"y" * 60), 1009),
    ],
)
def test_violations_name_their_close_code(stream, code):
    with pytest.raises(Violation) as info:
        FrameReader(max_size=100).feed(stream)
    assert info.value.code == code


def test_a_message_too_big_is_refused_before_its_payload_arrives():
    header = bytes([0x82, 0x80 | 127]) + (10**9).to_bytes(8, "big")
    with pytest.raises(Violation) as info:
        FrameReader(max_size=65536).feed(header)
    assert info.value.code == 1009


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_any_bytes_are_messages_or_a_violation(data):
    try:
        messages = FrameReader(max_size=1000).feed(data)
    except Violation as exc:
        assert exc.code in (1002, 1009)
        return
    for opcode, payload in messages:
        assert opcode in (wsframes.TEXT, wsframes.BINARY, wsframes.PING, wsframes.PONG, 8)
        assert isinstance(payload, bytes)


def test_close_frames():
    assert wsframes.parse_close(b"") == (1005, "")
    assert wsframes.parse_close((1000).to_bytes(2, "big") + b"bye") == (1000, "bye")
    for bad in (b"\x03", (999).to_bytes(2, "big"), (1005).to_bytes(2, "big")):
        with pytest.raises(Violation):
            wsframes.parse_close(bad)
    with pytest.raises(Violation) as info:
        wsframes.parse_close((1000).to_bytes(2, "big") + b"\xff")
    assert info.value.code == 1007


def test_server_frames_parse_in_websockets_client_side():
    """What the server writes, websockets' parser (client side of the same rules) reads."""
    peer = ServerProtocol(state=State.OPEN, max_size=None)
    peer.side = peer.side.__class__.CLIENT  # read as a client reads: unmasked frames
    for payload in (b"", b"x" * 125, b"y" * 126, b"z" * 70_000):
        peer.receive_data(wsframes.frame(wsframes.BINARY, payload))
        [event] = peer.events_received()
        assert (event.opcode, event.data) == (Opcode.BINARY, payload)
    peer.receive_data(wsframes.close_frame(1008, "far over the rate limit"))
    [event] = peer.events_received()
    assert event.opcode is Opcode.CLOSE and event.data[:2] == (1008).to_bytes(2, "big")


def test_a_long_close_reason_is_cut_to_fit_a_control_frame():
    built = wsframes.close_frame(1000, "é" * 200)
    assert len(built) <= 2 + 125
    code, reason = wsframes.parse_close(built[2:])
    assert code == 1000 and reason == "é" * 61
