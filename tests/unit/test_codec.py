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


def _nested(depth: int) -> object:
    """A value of ``depth`` lists, one in the other."""
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "raw",
    [
        msgpack.packb({"op": "pub", "topic": "a", "data": msgpack.Timestamp(1, 2)}),
        msgpack.packb({"op": "pub", "topic": "a", "data": {"t": msgpack.Timestamp(2**40, 7)}}),
        msgpack.packb({"op": "pub", "data": [msgpack.Timestamp(2**34 + 1, 0)]}),  # ext 8 form
        msgpack.packb({"op": "pub", "data": _nested(40)}),
        msgpack.packb({"op": "pub", "data": _nested(1000)}),
        json.dumps({"op": "pub", "data": _nested(40)}),
        # A surrogate bomb: escapes nested hundreds deep (it once overflowed a recursive walk).
        '{"op":"pub","data":' + '["\\ud800",' * 340 + "1" + "]" * 340 + "}",
        '{"op":"pub","data":{"k":"\\udfff"}}',
    ],
    ids=[
        "timestamp",
        "timestamp64",
        "timestamp96",
        "deep40",
        "deep1000",
        "json-deep40",
        "surrogate-bomb",
        "surrogate",
    ],
)
def test_poison_values_are_bad_frames(raw):
    with pytest.raises(BadFrame, match="undecodable"):
        codec.decode_frame(raw)


@pytest.mark.parametrize("encode", [msgpack.packb, json.dumps], ids=["msgpack", "json"])
def test_a_frame_may_nest_max_depth_levels_and_no_more(encode):
    # The frame itself is the first level.
    at_limit = encode({"op": "pub", "data": _nested(codec.MAX_DEPTH - 1)})
    assert codec.decode_frame(at_limit)["op"] == "pub"
    with pytest.raises(BadFrame, match="nested deeper than 32 levels"):
        codec.decode_frame(encode({"op": "pub", "data": _nested(codec.MAX_DEPTH)}))


def test_a_poison_frame_keeps_its_id():
    raw = msgpack.packb({"op": "pub", "id": "p1", "data": msgpack.Timestamp(1, 0)})
    with pytest.raises(BadFrame) as info:
        codec.decode_frame(raw)
    assert info.value.frame_id == "p1"


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
    # What was accepted can be delivered in either encoding.
    codec.decode_frame(codec.encode_msgpack(frame))
    json.loads(codec.encode_json(frame))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_a_msgpack_frame_with_any_data_is_a_frame_or_bad_frame(data):
    """Arbitrary MessagePack bytes as the data of a pub: the frame decodes and re-encodes in both
    encodings, or it is a BadFrame; nothing else escapes."""
    raw = b"\x82\xa2op\xa3pub\xa4data" + data
    try:
        frame = codec.decode_frame(raw)
    except BadFrame:
        return
    codec.decode_frame(codec.encode_msgpack(frame))
    json.loads(codec.encode_json(frame))


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
