"""The wire protocol's frames, error codes and close codes (PROTOCOL.md), without I/O.

Rules for this module:
- ``parse_client_frame`` turns a decoded frame into one of the op classes or raises a
  :class:`ProtocolError` subclass carrying the error code and the frame's ``id``.
- Server frames are plain dicts built by the functions at the bottom, so the codec can
  encode them once for every subscriber of an encoding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any

from sentientedge.errors import BadFrame, BadTopic, ProtocolError, UnknownOp
from sentientedge.topics import validate_filter, validate_topic

MAX_ID_CHARS = 64
MAX_TOPICS_PER_FRAME = 100


class ErrorCode(str, Enum):
    BAD_FRAME = "bad_frame"
    UNKNOWN_OP = "unknown_op"
    BAD_TOPIC = "bad_topic"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    QUEUE_FULL = "queue_full"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class CloseCode(IntEnum):
    NORMAL = 1000  # normal closure
    GOING_AWAY = 1001  # server going away (drain)
    POLICY = 1008  # abuse: too many bad frames, far over the rate limit
    TOO_LARGE = 1009  # frame larger than MAX_FRAME_BYTES
    INTERNAL = 1011  # internal error
    RESTART = 1012  # service restart
    TAKEN_OVER = 4000  # session taken over by a newer connection
    CREDENTIALS_ENDED = 4001  # credentials expired or revoked while connected


# Op classes are slotted but not frozen: one is built per client frame, and a frozen
# dataclass's __init__ sets each field through object.__setattr__.


@dataclass(slots=True)
class Publish:
    topic: str
    data: Any
    qos: int = 0
    id: str | None = None
    retain: bool = False


@dataclass(slots=True)
class Subscribe:
    topics: tuple[str, ...]
    id: Any = None


@dataclass(slots=True)
class Unsubscribe:
    topics: tuple[str, ...]
    id: Any = None


@dataclass(slots=True)
class Ack:
    seq: int


@dataclass(slots=True)
class Ping:
    id: Any = None


ClientOp = Publish | Subscribe | Unsubscribe | Ack | Ping


def parse_client_frame(frame: dict[str, Any]) -> ClientOp:
    """Check a decoded frame against PROTOCOL.md, "Client to server"."""
    op = frame["op"]
    parse = _PARSERS.get(op)
    if parse is None:
        raise UnknownOp(f"unknown op {op[:32]!r}", _frame_id(frame))
    return parse(frame)


def _frame_id(frame: dict[str, Any]) -> Any:
    """The ``id`` to echo: any scalar the client sent (containers are not echoed)."""
    frame_id = frame.get("id")
    return frame_id if isinstance(frame_id, str | int | float) else None


def _parse_pub(frame: dict[str, Any]) -> Publish:
    # The hot path (every telemetry message): the common case costs a handful of lookups; the
    # id to echo is worked out only when there is an error to answer.
    get = frame.get
    topic = get("topic")
    qos = get("qos", 0)
    retain = get("retain", False)
    msg_id = get("id")
    if type(topic) is not str:
        raise BadTopic("pub needs a string topic", _frame_id(frame))
    try:
        validate_topic(topic)
    except BadTopic as exc:
        raise BadTopic(exc.message, _frame_id(frame)) from None
    if "data" not in frame:
        raise BadFrame("pub needs data", _frame_id(frame))
    if type(qos) is not int or (qos != 0 and qos != 1):
        raise BadFrame("qos must be 0 or 1", _frame_id(frame))
    if type(retain) is not bool:
        raise BadFrame("retain must be a boolean", _frame_id(frame))
    if msg_id is not None and (type(msg_id) is not str or not 0 < len(msg_id) <= MAX_ID_CHARS):
        raise BadFrame(f"id must be a string of 1-{MAX_ID_CHARS} characters", _frame_id(frame))
    if qos == 1 and msg_id is None:
        raise BadFrame("qos 1 needs an id", _frame_id(frame))
    return Publish(topic, frame["data"], qos, msg_id, retain)


def _parse_topics(frame: dict[str, Any], op: str) -> tuple[str, ...]:
    frame_id = _frame_id(frame)
    topics = frame.get("topics")
    if not isinstance(topics, list) or not topics:
        raise BadFrame(f"{op} needs a non-empty list of topics", frame_id)
    if len(topics) > MAX_TOPICS_PER_FRAME:
        raise BadFrame(f"at most {MAX_TOPICS_PER_FRAME} topics per {op}", frame_id)
    for topic_filter in topics:
        if not isinstance(topic_filter, str):
            raise BadTopic(f"{op} topics must be strings", frame_id)
        try:
            validate_filter(topic_filter)
        except BadTopic as exc:
            raise BadTopic(f"{str(topic_filter)[:80]!r}: {exc.message}", frame_id) from None
    return tuple(dict.fromkeys(topics))


def _parse_sub(frame: dict[str, Any]) -> Subscribe:
    return Subscribe(topics=_parse_topics(frame, "sub"), id=_frame_id(frame))


def _parse_unsub(frame: dict[str, Any]) -> Unsubscribe:
    return Unsubscribe(topics=_parse_topics(frame, "unsub"), id=_frame_id(frame))


def _parse_ack(frame: dict[str, Any]) -> Ack:
    seq = frame.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise BadFrame("ack needs a non-negative integer seq", _frame_id(frame))
    return Ack(seq=seq)


def _parse_ping(frame: dict[str, Any]) -> Ping:
    return Ping(id=_frame_id(frame))


_PARSERS: dict[str, Callable[[dict[str, Any]], ClientOp]] = {
    "pub": _parse_pub,
    "sub": _parse_sub,
    "unsub": _parse_unsub,
    "ack": _parse_ack,
    "ping": _parse_ping,
}


# Server to client


def welcome_frame(
    session: str, resumed: bool, server: str, max_frame_bytes: int, rate_hz: float, queue_size: int
) -> dict[str, Any]:
    return {
        "op": "welcome",
        "session": session,
        "resumed": resumed,
        "server": server,
        "limits": {
            "max_frame_bytes": max_frame_bytes,
            "rate_hz": rate_hz,
            "queue_size": queue_size,
        },
    }


def msg_frame(topic: str, data: Any, qos: int, sender: str, ts: int) -> dict[str, Any]:
    return {"op": "msg", "topic": topic, "data": data, "qos": qos, "from": sender, "ts": ts}


def ack_frame(op: str, frame_id: Any, topics: tuple[str, ...] | list[str]) -> dict[str, Any]:
    frame: dict[str, Any] = {"op": op, "topics": list(topics)}
    if frame_id is not None:
        frame["id"] = frame_id
    return frame


def pong_frame(frame_id: Any) -> dict[str, Any]:
    return {"op": "pong", "id": frame_id} if frame_id is not None else {"op": "pong"}


def error_frame(code: ErrorCode | str, message: str, frame_id: Any = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"op": "error", "code": ErrorCode(code).value, "msg": message}
    if frame_id is not None:
        frame["id"] = frame_id
    return frame


def error_for(exc: ProtocolError) -> dict[str, Any]:
    return error_frame(exc.code, exc.message, exc.frame_id)
