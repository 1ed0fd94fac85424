"""WebSocket framing for the load generator's lean links (sentientedge.loadgen_link): no I/O.

The load generator shares its machine with the router it measures, so every microsecond it
spends per message is taken from the router. This module keeps the per-message work small:

- Client frames are built directly (RFC 6455 section 5.2): FIN, opcode, the length, the
  masking key and the masked payload, in one ``bytes``. Clients must mask every frame; a load
  generator has no intermediary to protect from, so each link masks with a key drawn once at
  random when it is created, not a fresh one per frame (the router unmasks either the same way).
- Server frames (never masked) are split out of the byte stream by :class:`FrameParser`, many
  per read, with the partial frame at the end kept for the next read.
- A drone's telemetry ``pub`` frame is MessagePack encoded once (:class:`TelemetryFrame`); each
  message only writes its ``seq`` and ``sent`` (and the QoS 1 ``id`` digits) into fixed-width
  slots, masks, and is ready to write.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

try:  # websockets' C helper; the pure-Python one where the extension was not built
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_SEQ = struct.Struct(">Q")  # MessagePack uint 64 (0xcf) body: big-endian
_F64 = struct.Struct(">d")  # MessagePack float 64 (0xcb) body


class FramingError(Exception):
    """The server broke RFC 6455 framing; the link fails the connection (close 1002)."""


def frame_header(opcode: int, length: int, mask: bytes) -> bytes:
    """FIN + opcode, the payload length with the mask bit set, then the masking key."""
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, 0x80 | length)) + mask
    if length < 65536:
        return _LEN16.pack(first, 0x80 | 126, length) + mask
    return _LEN64.pack(first, 0x80 | 127, length) + mask


def client_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """One whole masked client frame, ready for ``transport.write``."""
    return frame_header(opcode, len(payload), mask) + apply_mask(payload, mask)


def close_payload(code: int, reason: str = "") -> bytes:
    return _U16.pack(code) + reason.encode()


def parse_close(payload: bytes) -> tuple[int, str]:
    """A close frame's code and reason; 1005 (no status) for an empty payload (RFC 6455 7.1.5)."""
    if len(payload) < 2:
        return 1005, ""
    return _U16.unpack_from(payload)[0], payload[2:].decode("utf-8", "replace")


class FrameParser:
    """Splits the server's byte stream into ``(opcode, payload)`` frames.

    Control frames (close, ping, pong) come out as they arrive, even between the fragments of a
    message; a fragmented message comes out once, whole, with its first frame's opcode.
    """

    __slots__ = ("_fragment_op", "_fragments", "_rest", "max_size")

    def __init__(self, max_size: int = 1 << 24) -> None:
        self.max_size = max_size
        self._rest = b""
        self._fragments: list[bytes] = []
        self._fragment_op = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._rest + data if self._rest else data
        end = len(buf)
        pos = 0
        frames: list[tuple[int, bytes]] = []
        while end - pos >= 2:
            first = buf[pos]
            second = buf[pos + 1]
            length = second & 0x7F
            start = pos + 2
            if length == 126:
                if end - pos < 4:
                    break
                length = _U16.unpack_from(buf, pos + 2)[0]
                start = pos + 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = _U64.unpack_from(buf, pos + 2)[0]
                start = pos + 10
            if length > self.max_size:
                raise FramingError(f"frame of {length} bytes")
            masked = second & 0x80
            if masked:  # servers must not mask (RFC 6455 5.1); unmask rather than guess
                start += 4
            if end - start < length:
                break
            payload = buf[start : start + length]
            if masked:
                payload = apply_mask(payload, buf[start - 4 : start])
            pos = start + length
            opcode = first & 0x0F
            if first & 0x80 and opcode:  # a whole frame: the common case
                frames.append((opcode, payload))
            else:
                self._fragment(first, opcode, payload, frames)
        self._rest = buf[pos:] if pos < end else b""
        return frames

    def _fragment(
        self, first: int, opcode: int, payload: bytes, frames: list[tuple[int, bytes]]
    ) -> None:
        fin = first & 0x80
        if opcode >= OP_CLOSE:
            raise FramingError("fragmented control frame")
        if opcode:  # the first fragment of a message
            if self._fragments:
                raise FramingError("new message before the last one ended")
            self._fragment_op = opcode
        elif not self._fragments:
            raise FramingError("continuation frame without a message")
        self._fragments.append(payload)
        if fin:
            frames.append((self._fragment_op, b"".join(self._fragments)))
            self._fragments = []
        elif sum(map(len, self._fragments)) > self.max_size:
            raise FramingError("fragmented message too large")

    @property
    def pending(self) -> int:
        """Bytes held back: a partial frame, or fragments of an unfinished message."""
        return len(self._rest) + sum(map(len, self._fragments))


# Telemetry: encoded once, patched per message

# Placeholders the first encoding carries where the per-message values go. A uint 64 above
# 2**63 and a float 64 encode at fixed width (0xcf / 0xcb + 8 bytes), so the slots never move.
_SEQ_MARK = 0xFFFF_FFFF_FFFF_FF5E
_SENT_MARK = -1.2345678901234567e-300
_ID_DIGITS = 10


class TelemetryFrame:
    """A drone's telemetry ``pub`` frame, MessagePack, with slots for ``seq``, ``sent`` and ``id``.

    ``render`` encodes the whole frame (the realistic fields, topic, QoS) and finds the slots;
    ``frame(seq, sent)`` writes the slots and returns the masked WebSocket frame. The ``seq``
    and ``sent`` values decode as any other MessagePack integer and float; a QoS 1 frame's
    ``id`` is ``id_prefix`` followed by ``seq`` in ten digits.
    """

    __slots__ = ("_head", "_id_at", "_mask", "_payload", "_sent_at", "_seq_at", "id_prefix")

    def __init__(self, mask: bytes, id_prefix: str | None = None) -> None:
        self._mask = mask
        self.id_prefix = id_prefix  # QoS 1 when set
        self._payload = bytearray()
        self._head = b""
        self._seq_at = self._sent_at = self._id_at = -1

    def render(self, topic: str, data: dict[str, Any]) -> None:
        """Encode the frame around ``data``; its ``seq`` and ``sent`` are written per message."""
        frame: dict[str, Any] = {
            "op": "pub",
            "topic": topic,
            "data": {**data, "seq": _SEQ_MARK, "sent": _SENT_MARK},
        }
        if self.id_prefix is not None:
            frame["qos"] = 1
            frame["id"] = self.id_prefix + "0" * _ID_DIGITS
        payload = msgpack.packb(frame, use_bin_type=True)
        self._seq_at = payload.index(b"\xcf" + _SEQ.pack(_SEQ_MARK)) + 1
        self._sent_at = payload.index(b"\xcb" + _F64.pack(_SENT_MARK)) + 1
        if self.id_prefix is not None:
            marker = msgpack.packb(frame["id"])
            self._id_at = payload.rindex(marker) + len(marker) - _ID_DIGITS
        self._payload = bytearray(payload)
        self._head = frame_header(OP_BINARY, len(payload), self._mask)

    @property
    def rendered(self) -> bool:
        return bool(self._payload)

    def frame(self, seq: int, sent: float) -> bytes:
        payload = self._payload
        _SEQ.pack_into(payload, self._seq_at, seq)
        _F64.pack_into(payload, self._sent_at, sent)
        if self._id_at >= 0:
            payload[self._id_at : self._id_at + _ID_DIGITS] = b"%010d" % seq
        return self._head + apply_mask(payload, self._mask)

    def message_id(self, seq: int) -> str:
        """The ``id`` of QoS 1 message ``seq`` (what its ``puback`` carries)."""
        return f"{self.id_prefix}{seq:0{_ID_DIGITS}d}"


__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameParser",
    "FramingError",
    "TelemetryFrame",
    "apply_mask",
    "client_frame",
    "close_payload",
    "frame_header",
    "parse_close",
]
