"""The frame codec: both encodings, and the fuzz invariant (a frame or BadFrame, nothing else)."""

from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentientedge import codec
from sentientedge.codec import Encoding
from sentientedge.errors import BadFrame


def test_text_frames_are_json_and_binary_frames_are_msgpack():
    frame = {"op": "pub", "topic": "drone/1/telemetry", "data": {"alt": 12.5}}
    assert codec.decode_frame(json.dumps(frame)) == frame
    assert codec.decode_frame(msgpack.packb(frame)) == frame


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("{not json", "undecodable"),
        (b"\xc1", "undecodable"),
        ("[1, 2]", "not a map"),
        (msgpack.packb([1, 2]), "not a map"),
        ('{"topic": "a"}', "no string op"),
        ('{"op": 7}', "no string op"),
        ('{"op": "pub", "data": NaN}', "undecodable"),
        ('{"op": "pub", "data": 123456789012345678901234567890}', "undecodable"),
        ("[" * 100_000, "undecodable"),
        (msgpack.packb(msgpack.ExtType(1, b"x")), "undecodable"),
    ],
)
def test_bad_frames_raise_bad_frame(raw, reason):
    with pytest.raises(BadFrame, match=reason):
        codec.decode_frame(raw)


def test_bad_frame_keeps_the_id_when_there_is_one():
    with pytest.raises(BadFrame) as info:
        codec.decode_frame('{"id": "x1", "op": null}')
    assert info.value.frame_id == "x1"


def test_msgpack_values_reach_json_subscribers():
    frame = {"op": "msg", "data": {"blob": b"\x00\x01", b"key": 1, "inf": float("inf")}}
    decoded = json.loads(codec.encode_json(frame))
    assert decoded["data"] == {"blob": "AAE=", "key": 1, "inf": None}


def test_subprotocols_choose_the_encoding():
    assert Encoding.from_subprotocol("se1.msgpack") is Encoding.MSGPACK
    assert Encoding.from_subprotocol("se1.json") is Encoding.JSON
    assert Encoding.from_subprotocol(None) is Encoding.JSON


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_fuzz_any_input_is_a_frame_or_bad_frame(raw):
    try:
        frame = codec.decode_frame(raw)
    except BadFrame:
        return
    assert isinstance(frame, dict) and isinstance(frame["op"], str)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_fuzz_decoded_data_reencodes_in_both_encodings(data):
    frame = {"op": "pub", "data": data}
    for raw in (json.dumps(frame), msgpack.packb(frame)):
        decoded = codec.decode_frame(raw)
        assert codec.decode_frame(codec.encode_msgpack(decoded)) == decoded
        json.loads(codec.encode_json(decoded))


@pytest.mark.parametrize("size", [3, 15, 16, 70_000])
def test_with_fields_adds_to_a_map_without_decoding(size):
    frame = {f"k{i}": i for i in range(size)}
    patched = codec.with_fields(codec.encode_msgpack(frame), {"seq": 7, "dup": True})
    assert msgpack.unpackb(patched) == {**frame, "seq": 7, "dup": True}
