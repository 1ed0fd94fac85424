"""Property-based fuzzing of what a client can put on the wire, past the codec (which
tests/unit/test_codec.py fuzzes with raw bytes and text).

The invariant (as h11's fuzz harness states it): whatever a client sends, the pipeline
``codec.decode_frame`` -> ``protocol.parse_client_frame`` yields a valid client op or raises
one of the documented :class:`ProtocolError` types, nothing else; and every error answer built
for it carries a code of PROTOCOL.md and encodes in both JSON and MessagePack. The same for the
topic grammar (only BadTopic), the HTTP request head parser on the same port (a request, None
for now, or HttpError) and WebSocket frames (messages or a Violation).

Outcomes are checked against small models written from PROTOCOL.md and RFC 6455, not against
the code's own constants, so that a drift of either side shows.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sentientedge import codec, protocol, wsframes
from sentientedge.errors import BadFrame, BadTopic, ProtocolError, UnknownOp
from sentientedge.ingress.http import HttpError, HttpRequest, parse_request
from sentientedge.protocol import MAX_TOPICS_PER_FRAME, ErrorCode
from sentientedge.topics import TopicTrie, covers, matches, validate_filter, validate_topic
from sentientedge.wsframes import FrameReader, Violation

# PROTOCOL.md, "Error codes".
PROTOCOL_ERROR_CODES = frozenset(
    {
        "bad_frame",
        "unknown_op",
        "bad_topic",
        "forbidden",
        "rate_limited",
        "queue_full",
        "unavailable",
        "internal",
    }
)
# PROTOCOL.md: an id "at most 64 chars"; topics of "1 to 8 levels, each 1 to 64 characters".
MAX_ID_CHARS = 64
MAX_LEVELS = 8
MAX_LEVEL_CHARS = 64
# What the codec and the parser may raise for a client frame (sentientedge/errors.py).
PARSE_ERRORS = (BadFrame, UnknownOp, BadTopic)

FUZZ = settings(max_examples=80, deadline=None)  # the whole module in about 3 s


def mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``common`` three times in four: hostile inputs that are mostly right reach further."""
    return st.one_of(common, common, common, rare)


# Values a client can put in a frame: what JSON and MessagePack carry, and what they do not
# (NaN, integers beyond 64 bits, extension types). A value one encoding cannot carry (bytes in
# JSON, say) only leaves that encoding out of the wire forms tried.

plain_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.binary(max_size=8)
)
poison_scalars = (
    st.sampled_from([-(2**63) - 1, 2**64, 2**100, math.nan, math.inf, -math.inf])
    | st.builds(msgpack.Timestamp, st.integers(0, 2**34), st.integers(0, 999_999_999))
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4))
)
keys = st.text(max_size=6) | st.sampled_from(["op", "id", "topic", "data", "qos", "topics"])


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4)


def _nest(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(leaves, _containers, max_leaves=8)


values = mostly(_nest(plain_scalars), _nest(plain_scalars | poison_scalars))

# Topics: near the grammar (valid levels, wildcards in every position, '$', empty levels, levels
# and level counts at the bounds), and characters just outside it (unicode letters and digits,
# spaces, controls).
_NEAR_ALPHABET = "aZ09_.:-/+#$ é\u0130\u212a\u0663\n\x00"
small_levels = st.sampled_from(["a", "b", "+", "#", "$s", "$", "$$s", "", "a+", "#a"])
valid_levels = st.text(alphabet="abAB09_.:-", min_size=1, max_size=MAX_LEVEL_CHARS)
levels = (
    small_levels
    | valid_levels
    | st.text(alphabet=_NEAR_ALPHABET, max_size=4)
    | st.integers(MAX_LEVEL_CHARS - 1, MAX_LEVEL_CHARS + 1).map(lambda n: "x" * n)
    | st.integers(MAX_LEVEL_CHARS - 1, MAX_LEVEL_CHARS).map(lambda n: "$" + "x" * n)
)
topic_texts = (
    st.lists(levels, min_size=1, max_size=MAX_LEVELS + 1).map("/".join)
    | st.lists(st.sampled_from(["a", "b"]), min_size=MAX_LEVELS, max_size=MAX_LEVELS + 1).map(
        "/".join
    )
    | st.text(max_size=20)
)
valid_topics = st.tuples(
    valid_levels | valid_levels.map(lambda level: "$" + level[: MAX_LEVEL_CHARS - 1]),
    st.lists(valid_levels, max_size=MAX_LEVELS - 1),
).map(lambda parts: "/".join([parts[0], *parts[1]]))
# Filters and topics of few levels from few names, so that they meet often.
small_names = st.lists(small_levels, min_size=1, max_size=4).map("/".join)

# Fields of a frame: mostly of the right shape, else of any other.
ids = mostly(
    st.text(min_size=1, max_size=8),
    values
    | st.integers(0, 2 * MAX_ID_CHARS).map(lambda n: "i" * n)
    | st.integers(MAX_ID_CHARS - 1, MAX_ID_CHARS + 1).map(lambda n: "\u00e9" * n),
)
topic_fields = mostly(valid_topics, topic_texts | values)
qos_fields = mostly(
    st.sampled_from([0, 1]), st.sampled_from([True, False, 2, -1, 1.0, "1"]) | values
)
retain_fields = mostly(st.booleans(), st.sampled_from([0, 1, "true", None, 1.0, []]) | values)
topics_fields = mostly(
    st.lists(mostly(valid_topics | small_names, topic_texts), min_size=1, max_size=4),
    st.lists(topic_texts | values, max_size=3)
    | st.integers(MAX_TOPICS_PER_FRAME - 1, MAX_TOPICS_PER_FRAME + 1).map(lambda n: ["a/+"] * n)
    | st.tuples(valid_topics).map(lambda t: [t[0], t[0]])  # duplicates
    | values,
)
seq_fields = mostly(
    st.integers(0, 2**64 - 1),
    st.sampled_from([-1, True, False, 1.0, "3", None]) | st.integers(-(2**64), 2**65) | values,
)


def near_valid(op: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Frames of ``op`` with every field, or all but one of them."""
    return st.fixed_dictionaries({"op": st.just(op), **fields}).flatmap(
        lambda frame: st.lists(st.sampled_from(sorted(fields)), max_size=1).map(
            lambda drop: {k: v for k, v in frame.items() if k not in drop}
        )
    )


pub_frames = near_valid(
    "pub", topic=topic_fields, data=values, qos=qos_fields, id=ids, retain=retain_fields
)
client_frames = st.one_of(
    pub_frames,
    pub_frames,
    near_valid("sub", topics=topics_fields, id=ids),
    near_valid("unsub", topics=topics_fields, id=ids),
    near_valid("ack", seq=seq_fields),
    near_valid("ping", id=ids),
    st.fixed_dictionaries(
        {
            "op": st.sampled_from(["PUB", "pub ", "msg", "error", "", "\u0440ub", "pub\x00"])
            | st.text(max_size=40)
            | values
        },
        optional={"topic": topic_texts, "data": values, "id": ids, "topics": topics_fields},
    ),
)
extra_fields = st.dictionaries(keys | st.binary(max_size=4), values, max_size=2)


def wire_forms(frame: dict[Any, Any]) -> list[bytes | str]:
    """The frame as a text (JSON) and a binary (MessagePack) WebSocket message, each where the
    encoding can spell it at all."""
    forms: list[bytes | str] = []
    # JSON spells NaN and Infinity too (hostile), but not bytes, extension types, bytes keys.
    with contextlib.suppress(TypeError, ValueError):
        forms.append(json.dumps(frame))
    # MessagePack has no integers beyond 64 bits.
    with contextlib.suppress(TypeError, ValueError, OverflowError):
        forms.append(msgpack.packb(frame, use_bin_type=True))
    return forms


def model_decodes(value: Any, text: bool, depth: int = 1) -> bool:
    """Whether the codec takes ``value`` (codec.py's rules: both encodings can carry it, in at
    most 32 levels of maps and lists)."""
    if isinstance(value, dict | list) and depth > 32:
        return False
    if isinstance(value, dict):
        return all(model_decodes(v, text, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(model_decodes(v, text, depth + 1) for v in value)
    if isinstance(value, float):
        return not text or math.isfinite(value)  # JSON has no NaN or Infinity
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value <= 2**64 - 1
    return not isinstance(value, msgpack.Timestamp | msgpack.ExtType)


def model_errors(frame: dict[str, Any]) -> set[type[ProtocolError]]:
    """Every error PROTOCOL.md, "Client to server", lets the parser answer a decoded frame
    with (the order of the checks is the parser's choice); empty when it must be an op."""
    op = frame["op"]
    errors: set[type[ProtocolError]] = set()
    if op == "pub":
        topic, qos, msg_id = frame.get("topic"), frame.get("qos", 0), frame.get("id")
        if not (isinstance(topic, str) and oracle_topic(topic)):
            errors.add(BadTopic)
        if "data" not in frame or type(qos) is not int or qos not in (0, 1):
            errors.add(BadFrame)
        if type(frame.get("retain", False)) is not bool:
            errors.add(BadFrame)
        if msg_id is None:
            if qos == 1:
                errors.add(BadFrame)
        elif not (type(msg_id) is str and 0 < len(msg_id) <= MAX_ID_CHARS):
            errors.add(BadFrame)
    elif op in ("sub", "unsub"):
        topics = frame.get("topics")
        if not isinstance(topics, list) or not 0 < len(topics) <= MAX_TOPICS_PER_FRAME:
            errors.add(BadFrame)
        elif not all(isinstance(t, str) and oracle_filter(t) for t in topics):
            errors.add(BadTopic)
    elif op == "ack":
        seq = frame.get("seq")
        if type(seq) is not int or seq < 0:
            errors.add(BadFrame)
    elif op != "ping":
        errors.add(UnknownOp)
    return errors


def assert_encodable(frame: dict[str, Any]) -> None:
    """A server frame goes out in either encoding, and a client can read it back."""
    assert isinstance(json.loads(codec.encode_json(frame)), dict)
    assert isinstance(msgpack.unpackb(codec.encode_msgpack(frame), raw=False), dict)


def assert_valid_error_answer(exc: ProtocolError) -> None:
    answer = protocol.error_for(exc)
    assert answer["op"] == "error"
    assert answer["code"] in PROTOCOL_ERROR_CODES
    assert answer["code"] == exc.code
    assert isinstance(answer["msg"], str) and answer["msg"]
    assert_encodable(answer)


def _scalar_id(frame: dict[str, Any]) -> Any:
    """The id an answer echoes: the frame's, when it is a scalar."""
    frame_id = frame.get("id")
    return frame_id if isinstance(frame_id, str | int | float) else None


def _same(a: Any, b: Any) -> bool:
    """Equal, NaN included (which is not equal to itself, nor a list holding it to its copy)."""
    if a == b:
        return True
    try:
        return bool(msgpack.packb(a, use_bin_type=True) == msgpack.packb(b, use_bin_type=True))
    except (TypeError, ValueError, OverflowError):
        return False


def assert_valid_op(op: protocol.ClientOp, frame: dict[str, Any]) -> None:
    """What the parser let through is the frame's op, and its answer (or the message it
    becomes) can be sent in both encodings."""
    if isinstance(op, protocol.Publish):
        assert frame["op"] == "pub"
        assert (op.topic, op.qos, op.id) == (frame["topic"], frame.get("qos", 0), frame.get("id"))
        assert type(op.qos) is int and type(op.retain) is bool
        assert op.retain is frame.get("retain", False)
        message = protocol.msg_frame(op.topic, op.data, op.qos, "drone-1", 0)
        assert_encodable(message)
        # Stored as MessagePack, decoded again on its way to JSON subscribers and retained copies.
        assert _same(codec.decode_frame(codec.encode_msgpack(message))["data"], op.data)
        if op.id is not None:
            assert_encodable({"op": "puback", "id": op.id, "offset": "1-0"})
    elif isinstance(op, protocol.Subscribe | protocol.Unsubscribe):
        assert frame["op"] == ("sub" if isinstance(op, protocol.Subscribe) else "unsub")
        assert op.topics == tuple(dict.fromkeys(frame["topics"]))  # in order, once each
        assert _same(op.id, _scalar_id(frame))
        assert_encodable(protocol.ack_frame("suback", op.id, op.topics))
    elif isinstance(op, protocol.Ack):
        assert frame["op"] == "ack"
        assert type(op.seq) is int and op.seq == frame["seq"]
    elif isinstance(op, protocol.Ping):
        assert frame["op"] == "ping"
        assert _same(op.id, _scalar_id(frame))
        assert_encodable(protocol.pong_frame(op.id))
    else:
        raise AssertionError(f"not a client op: {op!r}")


# The frame pipeline


@FUZZ
@given(client_frames, extra_fields)
@example({"op": "pub", "topic": "a", "data": 1, "qos": False}, {})
@example({"op": "pub", "topic": "a", "data": 1, "qos": True, "id": "x"}, {})
@example({"op": "pub", "topic": "a", "data": 1, "retain": 1}, {})
@example({"op": "pub", "topic": "a", "qos": 0}, {})
@example({"op": "pub", "topic": "a", "data": 1, "qos": 1, "id": "x" * 65}, {})
@example({"op": "pub", "topic": "a", "data": 1, "id": ""}, {})
@example({"op": "pub", "topic": "a", "data": 2**64}, {})
@example({"op": "ping", "id": 1.5}, {})
@example({"op": "ack", "seq": True}, {})
@example({"op": "sub", "topics": ["a"] * (MAX_TOPICS_PER_FRAME + 1)}, {})
@example({"op": "sub", "topics": [["a"]], "id": {"x": 1}}, {})
@example({"op": ["pub"], "id": [1]}, {})
@example({"op": "\u0440ub", "id": b"\x00"}, {b"op": "pub"})
def test_any_frame_is_the_op_protocol_md_says_or_a_documented_error(frame, extra):
    frame = {**extra, **frame}
    forms = wire_forms(frame)
    for raw in forms:
        text = isinstance(raw, str)
        try:
            decoded = codec.decode_frame(raw)
        except BadFrame as exc:
            assert not (model_decodes(frame, text) and isinstance(frame["op"], str))
            assert exc.frame_id is None or _same(exc.frame_id, frame.get("id"))
            assert_valid_error_answer(exc)
            continue
        assert model_decodes(frame, text) and isinstance(frame["op"], str)
        expected = model_errors(decoded)
        try:
            op = protocol.parse_client_frame(decoded)
        except PARSE_ERRORS as exc:
            assert type(exc) in expected, (exc, expected)
            assert _same(exc.frame_id, _scalar_id(decoded))
            assert_valid_error_answer(exc)
            continue
        assert not expected, (op, expected)
        assert_valid_op(op, decoded)


# MessagePack extension values never get into a frame, whichever head carries them: msgpack
# decodes type -1 (Timestamp) itself, past ext_hook, from any ext head with 4, 8 or 12 bytes.
_EXT_HEADS = {
    "fixext": lambda size: bytes([{1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}[size]]),
    "ext8": lambda size: b"\xc7" + struct.pack(">B", size),
    "ext16": lambda size: b"\xc8" + struct.pack(">H", size),
    "ext32": lambda size: b"\xc9" + struct.pack(">I", size),
}


@FUZZ
@given(
    st.sampled_from(sorted(_EXT_HEADS)),
    st.sampled_from([1, 2, 4, 8, 12, 16]),
    st.sampled_from([-1, -1, -1, -128, 0, 1, 127]),
    st.binary(max_size=16),
    st.sampled_from(["data", "id", "nested"]),
)
@example("ext8", 4, -1, b"", "data")  # a Timestamp as ext 8 of 4 bytes once got through
@example("ext16", 12, -1, b"", "id")  # ... and as an id, made the error answer unencodable
def test_an_extension_value_in_any_ext_head_is_a_bad_frame(head, size, ext_type, data, where):
    if head == "fixext" and size == 12:
        size = 16  # no fixext 12
    payload = (data + bytes(size))[:size]
    ext = _EXT_HEADS[head](size) + struct.pack(">b", ext_type) + payload
    if where == "data":
        raw = b"\x83\xa2op\xa3pub\xa5topic\xa1a\xa4data" + ext
    elif where == "id":
        raw = b"\x82\xa2op\x05\xa2id" + ext  # no string op: the error echoes the id
    else:
        raw = b"\x83\xa2op\xa3pub\xa5topic\xa1a\xa4data\x91\x81\xa1t" + ext
    with pytest.raises(BadFrame) as info:
        codec.decode_frame(raw)
    assert_valid_error_answer(info.value)


# Error answers


def test_the_error_codes_are_those_of_protocol_md():
    assert {code.value for code in ErrorCode} == PROTOCOL_ERROR_CODES


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(list(ErrorCode)), st.text(max_size=40), st.data())
def test_every_error_answer_encodes_in_both_encodings(code, message, data):
    """``error_frame`` with any id a frame may carry (whatever a decoded frame holds)."""
    id_ = data.draw(values.filter(lambda v: bool(wire_forms({"id": v}))))
    raw = data.draw(st.sampled_from(wire_forms({"op": "x", "id": id_})))
    try:
        frame_id = codec.decode_frame(raw)["id"]
    except BadFrame as exc:
        frame_id = exc.frame_id
    for answer in (
        protocol.error_frame(code, message, frame_id),
        protocol.error_frame(code.value, message, frame_id),
    ):
        assert answer["code"] == code.value in PROTOCOL_ERROR_CODES
        assert_encodable(answer)


# Topic grammar, against an independent statement of PROTOCOL.md, "Topics", and MQTT 3.1.1
# section 4.7 for the wildcards.

_LEVEL_CHARS = re.compile(r"[A-Za-z0-9_.:-]+", re.ASCII)


def _level_ok(level: str, first: bool) -> bool:
    name = level[1:] if first and level.startswith("$") else level
    return 0 < len(level) <= MAX_LEVEL_CHARS and _LEVEL_CHARS.fullmatch(name) is not None


def oracle_topic(text: str) -> bool:
    parts = text.split("/")
    return len(parts) <= MAX_LEVELS and all(_level_ok(p, i == 0) for i, p in enumerate(parts))


def oracle_filter(text: str) -> bool:
    parts = text.split("/")
    return len(parts) <= MAX_LEVELS and all(
        p == "+" or (p == "#" and i == len(parts) - 1) or _level_ok(p, i == 0)
        for i, p in enumerate(parts)
    )


def model_matcher(topic_filter: str) -> Any:
    """MQTT 4.7 as a regular expression: '+' is one level, a last '#' the parent and any levels
    below it; a filter starting with a wildcard matches no '$' topic (4.7.2)."""
    parts = topic_filter.split("/")
    multi = parts[-1] == "#"
    body = "/".join("[^/]+" if p == "+" else re.escape(p) for p in parts[: -1 if multi else None])
    pattern = (body + "(?:/.*)?" if body else ".*") if multi else body
    if parts[0] in ("+", "#"):
        pattern = "(?!\\$)" + pattern
    return re.compile(pattern, re.DOTALL).fullmatch


def model_matches(topic_filter: str, topic: str) -> bool:
    return model_matcher(topic_filter)(topic) is not None


def _accepts(check: Any, text: str) -> bool:
    try:
        assert check(text) == tuple(text.split("/"))
    except BadTopic:
        return False
    return True


@settings(max_examples=150, deadline=None)
@given(topic_texts | valid_topics)
@example("$")
@example("$$s")
@example("$" + "x" * MAX_LEVEL_CHARS)
@example("a/" * (MAX_LEVELS - 1) + "#")
@example("a/" * MAX_LEVELS + "a")
@example("#/a")
@example("\u0663")
@example("a\n")
def test_topics_and_filters_follow_the_grammar_and_raise_only_bad_topic(text):
    is_topic = _accepts(validate_topic, text)
    is_filter = _accepts(validate_filter, text)
    assert is_topic == oracle_topic(text)
    assert is_filter == oracle_filter(text)
    if is_topic:
        assert matches(text, text)  # a topic as a filter matches itself
        assert covers(text, text)
    else:
        with pytest.raises(BadTopic):
            matches("#", text)


@FUZZ
@given(small_names | topic_texts, small_names | topic_texts)
@example("a/b", "a")
@example("a/#", "a")
@example("+/#", "$s/a")
def test_matches_is_mqtt_matching_and_raises_only_bad_topic(topic_filter, topic):
    try:
        matched = matches(topic_filter, topic)
    except BadTopic:
        assert not (oracle_filter(topic_filter) and oracle_topic(topic))
        return
    assert oracle_filter(topic_filter) and oracle_topic(topic)
    assert matched is model_matches(topic_filter, topic)
    assert covers(topic_filter, topic) is matched  # a topic is a filter without wildcards


# Every topic of up to 5 levels (one more than SMALL_FILTERS have) from the names they use and
# one they never use: enough to tell whether the topics of one filter hold those of another.
_UNIVERSE = [
    "/".join((first, *rest))
    for size in range(5)
    for first in ("a", "b", "z", "$s")
    for rest in itertools.product(("a", "b", "z"), repeat=size)
]
SMALL_FILTERS = [
    topic_filter
    for size in range(1, 5)
    for parts in itertools.product(("a", "b", "+", "#", "$s"), repeat=size)
    if oracle_filter(topic_filter := "/".join(parts))
]


def test_every_small_filter_matches_and_covers_as_mqtt_says():
    """Exhaustive over the 213 valid filters of up to 4 levels of a, b, +, # and $s: matches()
    against every topic of _UNIVERSE, and covers() as inclusion of the topics matched."""
    matched = {}
    for topic_filter in SMALL_FILTERS:
        model = model_matcher(topic_filter)
        matched[topic_filter] = frozenset(t for t in _UNIVERSE if model(t))
        for topic in _UNIVERSE:
            assert matches(topic_filter, topic) is (topic in matched[topic_filter])
    for pattern in SMALL_FILTERS:
        for topic_filter in SMALL_FILTERS:
            holds = matched[topic_filter] <= matched[pattern]
            assert covers(pattern, topic_filter) is holds, (pattern, topic_filter)


def test_plus_then_hash_covers_hash():
    """'#' matches topics of one level or more, and so does '+/#' ('#' takes in the parent
    level): found by the exhaustive check above, once wrong."""
    assert all(matches("+/#", t) for t in _UNIVERSE if matches("#", t))
    assert covers("+/#", "#") and not covers("+/+/#", "#") and not covers("+/x/#", "#")


@FUZZ
@given(valid_topics, st.data())
def test_wildcards_cut_from_a_topic_match_it(topic, data):
    """Any levels of a topic replaced with '+', and any tail with '#', still match it, except
    that a filter starting with a wildcard never matches a '$' topic (MQTT 4.7.2)."""
    parts = topic.split("/")
    pattern = [data.draw(st.sampled_from([p, "+"])) for p in parts]
    cut = data.draw(st.integers(0, len(parts)))
    if cut < len(parts) or data.draw(st.booleans()):
        pattern = [*pattern[:cut], "#"][:MAX_LEVELS]
    topic_filter = "/".join(pattern)
    dollar_hidden = topic.startswith("$") and pattern[0] in ("+", "#")
    assert matches(topic_filter, topic) is not dollar_hidden
    trie: TopicTrie[int] = TopicTrie()
    trie.add(topic_filter, 1)
    assert trie.match(topic) == (frozenset() if dollar_hidden else {1})


@FUZZ
@given(
    st.lists(small_names | topic_texts, max_size=8),
    small_names | topic_texts,
    st.lists(st.integers(0, 7), max_size=4),
)
@example(["a/0", "a"], "a", [0])  # removing a filter keeps the nodes a longer one still needs
def test_the_trie_matches_like_mqtt(filters, topic, removals):
    """Filters added, then some removed, with lookups between (the trie caches them)."""
    if not oracle_topic(topic):
        with pytest.raises(BadTopic):
            TopicTrie().match(topic)
        return
    trie: TopicTrie[str] = TopicTrie()
    held: list[str] = []

    def check() -> None:
        assert trie.match(topic) == {f for f in held if model_matches(f, topic)}

    for topic_filter in filters:
        try:
            trie.add(topic_filter, topic_filter)
        except BadTopic:
            assert not oracle_filter(topic_filter)
            continue
        held.append(topic_filter)
        check()
    for index in removals:
        if not held:
            break
        topic_filter = held[index % len(held)]
        trie.remove(topic_filter, topic_filter)
        held = [f for f in held if f != topic_filter]
        check()
    assert len(trie) == len(set(held))


# HTTP request heads on the WebSocket port

latin1 = st.characters(max_codepoint=0xFF)
_TARGET_ALPHABET = "/?&=%#[]:@\t ab\xe9\xbc\xb2\x00ws"
http_methods = st.sampled_from(["GET", "POST", "", "get", "G ET"]) | st.text(latin1, max_size=5)
http_targets = (
    st.sampled_from(["/ws", "/health", "/admin/scale-up", "*", "", "/ws?token=a&session=b"])
    | st.text(alphabet=_TARGET_ALPHABET, max_size=16)
    | st.text(latin1, max_size=16).map(lambda t: "/" + t)
)
http_versions = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/1.", "http/1.1", ""])
header_names = st.sampled_from(
    ["Host", "Content-Length", "content-length", "Transfer-Encoding", "Upgrade", " Host", ""]
) | st.text(alphabet="Xx-: \t\r\n\xe9", max_size=6)
header_values = (
    st.integers(0, 30).map(str)
    | st.integers(0, 2**70).map(str)
    | st.sampled_from(["", "-1", "+5", " 5 ", "0x10", "1e3", "5, 5", "chunked"])
    | st.text(latin1, max_size=12)
)


@FUZZ
@given(
    http_methods,
    http_targets,
    http_versions,
    st.lists(st.tuples(header_names, header_values), max_size=4),
    st.binary(max_size=20),
    st.sampled_from(["\r\n\r\n", "\r\n", "\n\n", ""]),
)
@example("POST", "/x", "HTTP/1.1", [("Content-Length", "3")], b"abcd", "\r\n\r\n")
@example("GET", "/x", "HTTP/1.1", [("", "x")], b"", "\r\n\r\n")
def test_any_request_head_is_a_request_none_or_http_error(
    method, target, version, headers, body, end
):
    head = f"{method} {target} {version}" + "".join(f"\r\n{n}:{v}" for n, v in headers) + end
    raw = head.encode("latin-1") + body
    for cut in (len(raw), len(head) + len(body) // 2, len(head) - 1):
        try:
            parsed = parse_request(raw[: max(cut, 0)])
        except HttpError as exc:
            assert 400 <= exc.status < 500 and exc.reason
            continue
        if parsed is not None:
            request, used = parsed
            assert isinstance(request, HttpRequest)
            assert raw.startswith(f"{request.method} ".encode("latin-1"))
            assert all(name and name == name.strip() for name, _ in request.headers.raw_items())
            length = int(request.headers.get("Content-Length", "0"))
            assert (request.head_size, used) == (raw.index(b"\r\n\r\n") + 4, used)
            assert request.body == raw[request.head_size : used] and len(request.body) == length


@pytest.mark.parametrize(
    "raw",
    [
        # str.isdigit() holds for '²' (latin-1 0xb2), which int() refuses.
        b"POST /x HTTP/1.1\r\nContent-Length: \xb2\r\n\r\nab",
        # More digits than int() converts (sys.get_int_max_str_digits()).
        b"POST /x HTTP/1.1\r\nContent-Length: " + b"0" * 5000 + b"\r\n\r\n",
        # urlsplit() raises for an unbalanced '[' in the authority of a '//' target.
        b"GET //[ HTTP/1.1\r\n\r\n",
        # websockets' Headers refuses control characters in a value with InvalidHeaderValue.
        b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n",
    ],
    ids=["superscript-digit", "too-many-digits", "ipv6-authority", "control-char-value"],
)
def test_http_heads_the_fuzzer_found_get_an_http_error(raw):
    """Each once escaped as ValueError or InvalidHeaderValue: the connection got no HTTP answer
    (PROTOCOL.md: every request gets one)."""
    with pytest.raises(HttpError):
        parse_request(raw)


# WebSocket frames: hostile headers and fragments, not just random bytes (test_wsframes.py
# fuzzes those), against a model of RFC 6455 sections 5.2-5.5 and 7.4.

MAX_MESSAGE = 100
_SENDABLE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
FrameSpec = tuple[bool, int, int, bytes]  # fin, rsv bits, opcode, payload


def _client_frame(spec: FrameSpec, mask: bytes, form: int) -> bytes:
    """A masked client frame; ``form`` picks the length encoding, minimal (0) or 16/64-bit."""
    fin, rsv, opcode, payload = spec
    size = len(payload)
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    if form == 0 and size < 126:
        length = bytes([0x80 | size])
    elif form in (0, 1) and size < 65536:
        length = bytes([0x80 | 126]) + size.to_bytes(2, "big")
    else:
        length = bytes([0x80 | 127]) + size.to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([first]) + length + mask + masked


def model_reader(frames: list[FrameSpec]) -> list[tuple[int, bytes]] | int:
    """The messages a server reads from these (masked) frames, or the close code to fail with."""
    out: list[tuple[int, bytes]] = []
    fragments: list[bytes] | None = None
    first_opcode = 0
    for fin, rsv, opcode, payload in frames:
        if rsv:
            return 1002  # no extension negotiated (5.2)
        if opcode in (0x0, 0x1, 0x2):
            if (opcode == 0x0) != (fragments is not None):
                return 1002  # a continuation without a start, or a start inside one (5.4)
            if len(b"".join(fragments or [])) + len(payload) > MAX_MESSAGE:
                return 1009
            if opcode != 0x0:
                fragments, first_opcode = [], opcode
            assert fragments is not None
            fragments.append(payload)
            if fin:
                out.append((first_opcode, b"".join(fragments)))
                fragments = None
        elif opcode in (0x8, 0x9, 0xA):
            if not fin or len(payload) > 125:
                return 1002  # control frames are whole and small (5.5)
            out.append((opcode, payload))
        else:
            return 1002  # reserved opcode
    return out


payloads = st.binary(max_size=60) | st.sampled_from([0, 99, 100, 101, 125, 126]).map(bytes)
# A message in fragments (continuations, pings between them), or one frame of any header.
messages_as_frames = st.tuples(
    st.sampled_from([0x1, 0x2]), st.lists(payloads, min_size=1, max_size=3), st.booleans()
).map(
    lambda m: (
        [(i == len(m[1]) - 1, 0, 0x0 if i else m[0], p) for i, p in enumerate(m[1])]
        + ([(True, 0, 0x9, b"p")] if m[2] else [])
    )
) | st.tuples(
    st.booleans(),
    st.sampled_from([0, 0, 0, 1, 2, 4, 7]),
    st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA]) | st.integers(0, 15),
    payloads,
).map(lambda spec: [spec])


@FUZZ
@given(
    st.lists(messages_as_frames, min_size=1, max_size=4).map(lambda ms: [f for m in ms for f in m]),
    st.binary(min_size=4, max_size=4),
    st.integers(0, 2),
    st.integers(1, 64),
)
@example([(False, 0, 0x1, b"x" * 60), (True, 0, 0x0, b"x" * 41)], b"abcd", 0, 7)
@example([(True, 4, 0x2, b"")], b"abcd", 0, 7)
@example([(False, 0, 0x1, b"x"), (True, 0, 0x2, b"y")], b"abcd", 0, 7)
@example([(False, 0, 0x9, b"")], b"abcd", 0, 7)
@example([(True, 0, 0xA, bytes(126))], b"abcd", 1, 7)
def test_hostile_frames_read_as_rfc_6455_says(frames, mask, form, step):
    stream = b"".join(_client_frame(spec, mask, form) for spec in frames)
    expected = model_reader(frames)
    reader = FrameReader(max_size=MAX_MESSAGE)
    messages: list[tuple[int, bytes]] = []
    try:
        for at in range(0, len(stream), step):
            messages.extend(reader.feed(stream[at : at + step]))
    except Violation as exc:
        assert exc.code == expected
        return
    assert messages == expected
    assert reader.buffered == 0


def model_close(payload: bytes) -> tuple[int, str] | int:
    """A close frame's code and reason (RFC 6455 5.5.1, 7.4), or the close code to fail with."""
    if not payload:
        return 1005, ""
    code = int.from_bytes(payload[:2], "big")
    if len(payload) < 2 or not (code in _SENDABLE or 3000 <= code <= 4999):
        return 1002
    try:
        return code, payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return 1007


@FUZZ
@given(
    st.tuples(
        st.sampled_from(sorted(_SENDABLE | {999, 1004, 1005, 1006, 1015, 2999, 3000, 4999, 5000}))
        | st.integers(0, 65535),
        st.binary(max_size=8) | st.text(max_size=8).map(str.encode),
    ).map(lambda pair: pair[0].to_bytes(2, "big") + pair[1])
    | st.binary(max_size=3)
)
@example(b"\x03\xe8\xff")  # a reason that is not utf-8
@example(b"\x03\xed")  # 1005 is never sent
def test_any_close_payload_is_a_code_and_reason_or_a_violation(payload):
    try:
        parsed: tuple[int, str] | int = wsframes.parse_close(payload)
    except Violation as exc:
        parsed = exc.code
    assert parsed == model_close(payload)


@FUZZ
@given(st.sampled_from([1000, 1001, 1008, 1009, 1011, 1012, 4000, 4001]), st.text(max_size=130))
@example(1000, "\u00e9" * 70)  # cut inside a character unless cut with care
@example(1000, "x" * 122 + "\U0001f681")
def test_every_close_frame_we_send_parses_back(code, reason):
    frame = wsframes.close_frame(code, reason)
    assert frame[0] == 0x80 | wsframes.CLOSE and frame[1] <= 125
    parsed_code, parsed_reason = wsframes.parse_close(frame[2:])
    assert parsed_code == code
    assert reason.startswith(parsed_reason)
    assert len(parsed_reason.encode()) > 123 - 4 or parsed_reason == reason
