"""Frame encoding: JSON in text frames, MessagePack in binary frames (PROTOCOL.md, "Transport").

Rules for this module:
- ``decode_frame`` returns a dict with a string ``op`` or raises :class:`BadFrame`; never
  anything else, whatever the input (the fuzz test in tests/test_codec.py holds it to that).
- Decoded values are limited to what both encodings can carry, so any frame received in
  one encoding can be delivered in the other: integers fit in 64 bits, no extension types.
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


def decode_frame(data: bytes | str) -> dict[str, Any]:
    """Decode one client frame: ``str`` is JSON, ``bytes`` is MessagePack."""
    try:
        if isinstance(data, str):
            frame = _json_decoder.decode(data)
        else:
            frame = msgpack.unpackb(data, raw=False, ext_hook=_reject_ext, strict_map_key=True)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise BadFrame(f"undecodable frame: {_short(exc)}") from None
    if not isinstance(frame, dict):
        raise BadFrame("frame is not a map")
    op = frame.get("op")
    if not isinstance(op, str):
        raise BadFrame("frame has no string op", frame.get("id"))
    return frame


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
