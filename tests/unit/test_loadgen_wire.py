"""The load generator's own framing (sentientedge.loadgen_wire), checked against websockets'.

Client frames must be what websockets' server-side parser accepts (masked, right lengths);
server frames, as websockets' server writes them, must come out of FrameParser whole, however
the byte stream is cut.
"""

from __future__ import annotations

import os
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from sentientedge.fleet import telemetry
from sentientedge.loadgen_wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    FrameParser,
    FramingError,
    TelemetryFrame,
    client_frame,
    close_payload,
    parse_close,
)

MASK = b"\x37\xfa\x21\x3d"


def server_reads(wire: bytes) -> list[Frame]:
    """What a websockets server makes of bytes a client sent (it checks masking and lengths)."""
    server = ServerProtocol(state=OPEN, max_size=None)
    server.receive_data(wire)
    assert server.parser_exc is None
    return [event for event in server.events_received() if isinstance(event, Frame)]


def server_frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=False, extensions=[])  # servers don't mask


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_client_frames_are_masked_frames_a_server_accepts_at_every_length(size):
    payload = os.urandom(size)
    wire = client_frame(OP_BINARY, payload, MASK)
    assert wire[1] & 0x80  # the mask bit: clients must mask (RFC 6455 5.3)
    [frame] = server_reads(wire)
    assert frame.opcode is Opcode.BINARY and frame.fin and frame.data == payload


def test_text_ping_and_close_frames():
    frames = server_reads(
        client_frame(OP_TEXT, b'{"op":"ping"}', MASK)
        + client_frame(0xA, b"abcd", MASK)
        + client_frame(OP_CLOSE, close_payload(1000, "bye"), MASK)
    )
    assert [f.opcode for f in frames] == [Opcode.TEXT, Opcode.PONG, Opcode.CLOSE]
    assert frames[0].data == b'{"op":"ping"}' and frames[1].data == b"abcd"
    assert Close.parse(frames[2].data) == Close(1000, "bye")
    assert parse_close(close_payload(4000, "taken over")) == (4000, "taken over")
    assert parse_close(b"") == (1005, "")


def test_a_read_holds_many_frames_and_a_partial_one_waits_for_the_rest():
    big = os.urandom(70000)
    small = (
        server_frame(Opcode.BINARY, b"one")
        + server_frame(Opcode.PING, b"pi")
        + server_frame(Opcode.TEXT, b"two")
    )
    stream = small + server_frame(Opcode.BINARY, big)
    parser = FrameParser()
    assert parser.feed(stream[:-10]) == [(OP_BINARY, b"one"), (OP_PING, b"pi"), (OP_TEXT, b"two")]
    assert parser.pending == len(stream) - 10 - len(small)
    assert parser.feed(stream[-10:]) == [(OP_BINARY, big)]
    assert parser.pending == 0


def test_fragments_come_out_as_one_message_with_control_frames_passing_between():
    stream = (
        server_frame(Opcode.TEXT, b"frag", fin=False)
        + server_frame(Opcode.PING, b"!")
        + server_frame(Opcode.CONT, b"ment", fin=False)
        + server_frame(Opcode.CONT, b"ed", fin=True)
    )
    assert FrameParser().feed(stream) == [(OP_PING, b"!"), (OP_TEXT, b"fragmented")]


@pytest.mark.parametrize(
    "stream, reason",
    [
        (server_frame(Opcode.CONT, b"x"), "continuation frame without a message"),
        (server_frame(Opcode.TEXT, b"a", False) * 2, "new message before the last one ended"),
        (bytes((0x82, 127)) + (1 << 40).to_bytes(8, "big"), "frame of"),
    ],
)
def test_broken_framing_is_an_error(stream, reason):
    with pytest.raises(FramingError, match=reason):
        FrameParser().feed(stream)


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=20),
)
def test_any_cutting_of_the_stream_gives_the_same_frames(payloads, cuts):
    stream = b"".join(server_frame(Opcode.BINARY, p) for p in payloads)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    parser = FrameParser()
    out = []
    for start, end in zip([0, *points], [*points, len(stream)], strict=True):
        out += parser.feed(stream[start:end])
    assert out == [(OP_BINARY, p) for p in payloads]
    assert parser.pending == 0


def test_a_masked_server_frame_is_unmasked():
    wire = Frame(Opcode.BINARY, b"masked by mistake").serialize(mask=True, extensions=[])
    assert FrameParser().feed(wire) == [(OP_BINARY, b"masked by mistake")]


def decode(wire: bytes) -> dict:
    [frame] = server_reads(wire)
    assert frame.opcode is Opcode.BINARY
    return msgpack.unpackb(frame.data)


def test_telemetry_frame_carries_each_messages_seq_and_sent_in_the_realistic_fields():
    frame = TelemetryFrame(MASK)
    now = time.time()
    frame.render("drone/d1/telemetry", {**telemetry("d1", 0, now), "pad": "x" * 40})
    for seq, sent in ((0, now), (1, now + 0.02), (2**40, now + 1e6)):
        pub = decode(frame.frame(seq, sent))
        assert pub["op"] == "pub" and pub["topic"] == "drone/d1/telemetry"
        assert "qos" not in pub and "id" not in pub
        data = pub["data"]
        assert data["seq"] == seq and data["sent"] == sent
        assert set(data) == {"seq", "sent", "pos", "att", "vel", "battery", "mode", "pad"}


def test_qos1_telemetry_frame_has_an_id_per_seq():
    frame = TelemetryFrame(MASK, id_prefix="t18c-")
    frame.render("drone/d1/telemetry", telemetry("d1", 0, time.time()))
    first, second = decode(frame.frame(7, 1.0)), decode(frame.frame(123456, 2.0))
    assert first["qos"] == 1 and first["id"] == frame.message_id(7) == "t18c-0000000007"
    assert second["id"] == "t18c-0000123456" and second["data"]["seq"] == 123456


def test_rendering_again_moves_the_flight_fields_and_keeps_the_slots_right():
    frame = TelemetryFrame(MASK)
    frame.render("drone/d1/telemetry", telemetry("d1", 0, 1000.0))
    before = decode(frame.frame(1, 1000.0))
    frame.render("drone/d1/telemetry", telemetry("d1", 50, 1300.0))
    after = decode(frame.frame(51, 1300.0))
    assert after["data"]["pos"] != before["data"]["pos"]
    assert (after["data"]["seq"], after["data"]["sent"]) == (51, 1300.0)
