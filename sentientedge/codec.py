"""Frame encoding: JSON in text frames, MessagePack in binary frames (PROTOCOL.md, "Transport").

Rules for this module:
- ``decode_frame`` returns a dict with a string ``op`` or raises :class:`BadFrame`; never
  anything else, whatever the input (the fuzz test in tests/unit/test_codec.py holds it to that).
- Decoded values are limited to what both encodings can carry, so any frame received in
  one encoding can be delivered in the other: integers fit in 64 bits, no extension types
  (Timestamp included), no lone surrogates, at most ``MAX_DEPTH`` levels of maps and lists.
- MessagePack ``bin`` values reach JSON subscribers as base64 strings, non-finite floats
  (``1e999`` in JSON, ``inf`` in MessagePack) as ``null``.
"""

from __future__ import annotations

import base64
import json
import math
from enum import Enum
from typing import Any

import msgpack

from sentientedge.errors import BadFrame

_INT_MIN = -(2**63)
_UINT_MAX = 2**64 - 1


class Encoding(str, Enum):
    JSON = "json"
    MSGPACK = "msgpack"

    @property
    def subprotocol(self) -> str:
        return f"se1.{self.value}"

    @classmethod
    def from_subprotocol(cls, subprotocol: str | None) -> Encoding:
        # Without a subprotocol the server speaks JSON (PROTOCOL.md, "Transport").
        return cls.MSGPACK if subprotocol == "se1.msgpack" else cls.JSON


SUBPROTOCOLS = (Encoding.MSGPACK.subprotocol, Encoding.JSON.subprotocol)


def _parse_int(text: str) -> int:
    value = int(text)
    if value < _INT_MIN or value > _UINT_MAX:
        raise ValueError("integer out of 64-bit range")
    return value


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError("msgpack extension types are not accepted")


_json_decoder = json.JSONDecoder(parse_int=_parse_int, parse_constant=_reject_constant)

# A frame nests at most this many maps and lists, itself included: deeper data costs every
# encoder on its way (and Python's recursion) far more than any drone needs.
MAX_DEPTH = 32

# Bytes that open a MessagePack map or array (fixmap, fixarray, array 16/32, map 16/32). How many
# a frame holds bounds its nesting from above, so only a frame with more than MAX_DEPTH of them
# pays for a walk over its values; telemetry holds a handful.
_CONTAINER_HEADS = frozenset(range(0x80, 0xA0)) | {0xDC, 0xDD, 0xDE, 0xDF}
_CONTAINER_HEAD_BYTES = bytes(sorted(_CONTAINER_HEADS))
# msgpack decodes the Timestamp extension (type -1) itself, without calling ext_hook: fixext 4,
# fixext 8 and ext 8 of type 0xff. A frame holding one of these byte runs is walked; one
# without any extension head byte (ext 8/16/32, fixext 1-16) cannot hold one.
_EXT_HEADS = frozenset({0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})
_NOT_HEADS = bytes(b for b in range(256) if b not in _CONTAINER_HEADS | _EXT_HEADS)
# msgpack decodes type -1 as a Timestamp whatever the ext head that carries it, as long as the
# payload is 4, 8 or 12 bytes: not only the canonical fixext 4, fixext 8 and ext 8 of 12 that
# msgpack writes, but also ext 8 of 4 or 8 and ext 16/32 of 4, 8 or 12, which a client can
# send. Matching only the canonical runs let a Timestamp through into a frame (found by
# tests/unit/test_protocol_fuzz.py): JSON subscribers could not be sent it, and as a frame's
# id it made the error answer unencodable.
# A scan for 0xff and a look at the bytes before each, not a regex: an alternation tried at
# every offset cost 4.5 us a telemetry frame (decode_frame 2 -> 6.4 us).
_EXT_LENGTH_HEADS = (b"\xc7", b"\xc8\x00", b"\xc9\x00\x00\x00")  # ext 8, 16, 32 of a size


def _may_hold_timestamp(data: bytes) -> bool:
    at = data.find(b"\xff", 1)
    while at > 0:
        before = data[at - 1]
        if before == 0xD6 or before == 0xD7:  # fixext 4, fixext 8
            return True
        if before in (4, 8, 12) and any(
            data[max(0, at - 1 - len(head)) : at - 1] == head for head in _EXT_LENGTH_HEADS
        ):
            return True
        at = data.find(b"\xff", at + 1)
    return False


def decode_frame(data: bytes | str) -> dict[str, Any]:
    """Decode one client frame: ``str`` is JSON, ``bytes`` is MessagePack."""
    try:
        if isinstance(data, str):
            frame = _json_decoder.decode(data)
            walk = data.count("{") + data.count("[") > MAX_DEPTH or "\\u" in data
        else:
            frame = msgpack.unpackb(data, raw=False, ext_hook=_reject_ext, strict_map_key=True)
            heads = data.translate(None, _NOT_HEADS)
            walk = len(heads) > MAX_DEPTH or (
                # An extension's head byte (floats hold some by chance): is it a Timestamp?
                bool(heads.translate(None, _CONTAINER_HEAD_BYTES)) and _may_hold_timestamp(data)
            )
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise BadFrame(f"undecodable frame: {_short(exc)}") from None
    if not isinstance(frame, dict):
        raise BadFrame("frame is not a map")
    if walk:
        problem = _value_problem(frame)
        if problem is not None:
            frame_id = frame.get("id")
            raise BadFrame(f"undecodable frame: {problem}", frame_id if _scalar(frame_id) else None)
    op = frame.get("op")
    if not isinstance(op, str):
        raise BadFrame("frame has no string op", frame.get("id"))
    return frame


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def _value_problem(frame: dict[str, Any]) -> str | None:
    """What makes a decoded frame unfit to carry, or None: nesting beyond MAX_DEPTH, an
    extension value, or a lone UTF-16 surrogate (JSON escapes can spell one, "\\ud800", which no
    UTF-8 encoder, and so no subscriber's frame, can carry). Iterative: depth costs no stack."""
    stack: list[tuple[Any, int]] = [(frame, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        value, depth = pop()
        kind = type(value)
        if kind is dict:
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            for key, item in value.items():
                push((key, depth))
                push((item, depth + 1))
        elif kind is list:
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            for item in value:
                push((item, depth + 1))
        elif kind is str:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "lone surrogate in a string"
        elif isinstance(value, msgpack.Timestamp | msgpack.ExtType):
            return "msgpack extension types are not accepted"
    return None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def encode_msgpack(frame: dict[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def encode_json(frame: dict[str, Any]) -> str:
    try:
        return json.dumps(
            frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
        )
    except (TypeError, ValueError):
        # bytes map keys or non-finite floats from MessagePack: the slow, careful path.
        return json.dumps(_jsonable(frame), separators=(",", ":"), ensure_ascii=False)


def encode(frame: dict[str, Any], encoding: Encoding) -> bytes | str:
    return encode_msgpack(frame) if encoding is Encoding.MSGPACK else encode_json(frame)


def _json_default(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {_json_key(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return _json_default(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_key(key: object) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return key.decode("utf-8", "backslashreplace")
    return str(key)


def with_fields(frame: bytes, fields: dict[str, Any]) -> bytes:
    """Add fields to a MessagePack-encoded map without decoding it.

    Delivery adds ``seq``, ``dup`` or ``retained`` to a stored ``msg`` frame for each session;
    this rewrites the map header and appends the pairs, so the payload is never re-encoded.
    The fields must not be in the map already.
    """
    first = frame[0]
    if 0x80 <= first <= 0x8F:
        count, body = first & 0x0F, frame[1:]
    elif first == 0xDE:
        count, body = int.from_bytes(frame[1:3], "big"), frame[3:]
    elif first == 0xDF:
        count, body = int.from_bytes(frame[1:5], "big"), frame[5:]
    else:
        raise ValueError("not a MessagePack map")
    count += len(fields)
    if count <= 0x0F:
        header = bytes((0x80 | count,))
    elif count <= 0xFFFF:
        header = b"\xde" + count.to_bytes(2, "big")
    else:
        header = b"\xdf" + count.to_bytes(4, "big")
    extra = b"".join(
        msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in fields.items()
    )
    return header + body + extra
