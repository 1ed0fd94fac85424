"""One client connection: bytes in and out of an ``asyncio.Protocol``. No task per connection:
the event loop calls in. websockets' sans-I/O ``ServerProtocol`` checks and answers the opening
handshake; the frames of the open connection are :mod:`sentientedge.wsframes`' (a quarter of
the CPU per frame, and none of ``ServerProtocol``'s two kilobytes per connection).

Life of a connection: ``HEAD`` (reading the HTTP request) -> ``ADMITTING`` (the handshake checks
run; reading paused) -> ``OPEN`` (frames) -> ``CLOSING`` -> gone (``connection_lost``). A
request that is not a WebSocket upgrade is answered and closed.

Rules for this module:
- Frames from the client are handled in order, one at a time: while one waits for the router
  (a ``sub``), the next ones wait too and reading pauses beyond a few.
- Outgoing frames are built here (server frames are not masked) and written once per turn of
  the event loop, many frames per write, while the client keeps up. When it does not (the
  transport paused writing), QoS 0 messages wait in a queue of ``MESSAGE_QUEUE_SIZE`` whose
  oldest are dropped first; answers, errors and QoS 1 messages are never dropped (QoS 1 is
  bounded by the session's window).
- Closing follows RFC 6455 7.1: a close frame each way, then the server closes the socket
  (after ``CLOSE_TIMEOUT_S`` without the client's, it aborts it). A client that breaks the
  protocol is failed: a close frame with the code (1002, 1007, 1009), then the socket closes.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import deque
from enum import Enum
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from sentientedge import codec, protocol, wsframes
from sentientedge.codec import Encoding
from sentientedge.ingress.http import HttpError, HttpRequest, error_response, parse_request
from sentientedge.protocol import ErrorCode
from sentientedge.wsframes import FrameReader, Violation

if TYPE_CHECKING:
    from sentientedge.auth import Identity
    from sentientedge.ingress.handshake import Admission
    from sentientedge.ingress.server import IngressServer
    from sentientedge.ratelimit import BadFrameGuard, RateGuard
    from sentientedge.sessions import AttachedSession

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0  # after our close frame, how long the client has to answer with its own
MAX_WAITING_FRAMES = 32  # frames queued behind a slow one before reading pauses
KEEPALIVE_REASON = "keepalive ping timeout"
NO_SUBSCRIPTIONS: frozenset[str] = frozenset()


def server_frame(payload: bytes, text: bool) -> bytes:
    """A whole server frame, built once per message and written to every subscriber of its
    encoding."""
    return wsframes.frame(wsframes.TEXT if text else wsframes.BINARY, payload)


def frame_for(encoded: bytes | str) -> bytes:
    if type(encoded) is bytes:
        return server_frame(encoded, False)
    return server_frame(cast(str, encoded).encode(), True)


def encode_stored(conn: ClientConnection, frame: bytes, fields: dict[str, Any]) -> bytes | str:
    """A stored ``msg`` frame (MessagePack) with ``fields`` added, in the client's encoding."""
    if conn.encoding is Encoding.MSGPACK:
        return codec.with_fields(frame, fields)
    return codec.encode_json({**codec.decode_frame(frame), **fields})


class Phase(Enum):
    HEAD = "head"
    ADMITTING = "admitting"
    HTTP = "http"
    OPEN = "open"
    CLOSING = "closing"
    GONE = "gone"


class ClientConnection(asyncio.Protocol):
    # Slots: ten thousand idle connections each pay for every attribute.
    __slots__ = (
        "_buffer",
        "_close_timer",
        "_early",
        "_held",
        "_out",
        "_waiting",
        "admission",
        "bad_frames",
        "busy",
        "close_received",
        "close_sent",
        "closed_by",
        "connection_id",
        "dropped",
        "encoding",
        "identity",
        "last_heard",
        "opened_at",
        "paused",
        "peer_address",
        "phase",
        "ping_sent",
        "principal",
        "publish_links",
        "qos1_in_flight",
        "queue_full_told",
        "rate",
        "reader",
        "sender",
        "server",
        "session",
        "session_id",
        "subscriptions",
        "transport",
        "ws",
    )

    def __init__(self, server: IngressServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer_address = ""  # the client's IP address (rate limits, audit)
        self.phase = Phase.HEAD
        self._buffer: bytearray | None = bytearray()
        self.ws: ServerProtocol | None = None
        self._out: list[bytes] = []
        self._held: deque[bytes] | None = None
        self._waiting: deque[bytes | str] | None = None
        self._early = b""  # bytes that came behind the request, before the handshake ended
        self.reader: FrameReader | None = None
        self.close_sent: int | None = None  # the code of our close frame
        self.close_received: bool | None = None  # True: the client's came first
        self._close_timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.busy = False
        self.admission: Admission | None = None
        self.closed_by: str | None = None
        self.last_heard = 0.0
        self.ping_sent: float | None = None
        self.dropped = 0
        self.qos1_in_flight = 0
        self.queue_full_told = 0.0
        self.subscriptions: set[str] | frozenset[str] = NO_SUBSCRIPTIONS  # a set once subscribed
        # topic -> the stream to its shard, or None where it may not publish: a drone publishes
        # on a few topics thousands of times, and this is looked up on every one.
        self.publish_links: dict[str, Any] | None = None
        # Set when the handshake admits the connection (see ``opened``).
        self.identity: Identity
        self.sender = ""
        self.principal = ""
        self.connection_id = ""
        self.session_id = ""
        self.encoding = Encoding.JSON
        self.opened_at = 0
        self.rate: RateGuard
        self.bad_frames: BadFrameGuard
        self.session: AttachedSession

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        # Interned: thousands of clients behind one NAT or load balancer share one string.
        self.peer_address = (
            sys.intern(str(peer[0])) if isinstance(peer, tuple) and peer else "local"
        )
        self.last_heard = self.server.clock()
        self.server.accepted(self)

    def data_received(self, data: bytes) -> None:
        self.last_heard = self.server.clock()
        phase = self.phase
        if phase is Phase.OPEN or phase is Phase.CLOSING:
            self._read_frames(data)
        elif phase is Phase.HEAD:
            self._read_head(data)
        elif phase is Phase.ADMITTING:
            self._early += data  # handled once open (reading is paused meanwhile)

    def eof_received(self) -> bool | None:
        return None  # the client is done sending: close the transport

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        held = self._held
        if held:
            self._out.extend(held)
            held.clear()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = Phase.GONE
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._out.clear()
        self._held = None
        self.server.lost(self)

    @property
    def holds(self) -> bool:
        """Whether the socket still holds its session (the keeper retries writes while so)."""
        return self.phase is not Phase.GONE

    # The request

    def _read_head(self, data: bytes) -> None:
        buffer = self._buffer
        assert buffer is not None
        buffer += data
        try:
            parsed = parse_request(buffer)
        except HttpError as exc:
            self.answer_http(error_response(exc.status, "bad_request", exc.reason))
            return
        if parsed is None:
            return
        request, _ = parsed
        if request.wants_websocket and request.method == "GET":
            self._start_websocket(request, bytes(buffer))
        else:
            self.phase = Phase.HTTP
            self._buffer = None
            self.server.http_request(self, request)

    def _start_websocket(self, request: HttpRequest, raw: bytes) -> None:
        config = self.server.config
        ws = ServerProtocol(
            subprotocols=list(codec.SUBPROTOCOLS),  # type: ignore[arg-type]
            select_subprotocol=_select_subprotocol,
            max_size=config.max_frame_bytes,
        )
        ws.receive_data(raw[: request.head_size])  # the head again, now for websockets
        self._early = raw[request.head_size :]  # frames sent right behind it, for later
        events = ws.events_received()
        self._buffer = None
        if not events or not isinstance(events[0], Request):
            self.answer_http(
                error_response(HTTPStatus.BAD_REQUEST, "bad_request", "malformed request")
            )
            return
        self.ws = ws
        # websockets checks the upgrade (headers, version, subprotocol) before anything costs a
        # round trip to the router; its answer is sent once the router admits the client.
        upgrade = ws.accept(events[0])
        if upgrade.status_code != 101:
            self.answer_http(upgrade.serialize())
            return
        self.phase = Phase.ADMITTING
        assert self.transport is not None
        self.transport.pause_reading()  # until admitted: nothing to do with frames yet
        self.server.handshake(self, request, upgrade)

    def answer_http(self, answer: bytes) -> None:
        """Answer a plain HTTP request (or refuse a handshake) and close."""
        if self.phase is Phase.GONE or self.transport is None:
            return
        self.phase = Phase.CLOSING
        self.transport.write(answer)
        self.transport.close()

    def accept(self, upgrade: Response) -> None:
        """Finish the opening handshake: 101 Switching Protocols. websockets' part ends here."""
        ws = self.ws
        assert ws is not None and self.transport is not None
        self.transport.write(upgrade.serialize())
        self.encoding = Encoding.from_subprotocol(ws.subprotocol)
        self.reader = FrameReader(self.server.config.max_frame_bytes)
        self.ws = None

    def opened(self) -> None:
        """Admitted and accepted: frames flow. Those sent early are handled now."""
        self.phase = Phase.OPEN
        self.last_heard = self.server.clock()
        assert self.transport is not None
        self.transport.resume_reading()
        early, self._early = self._early, b""
        if early:
            self._read_frames(early)

    # Frames in

    def _read_frames(self, data: bytes) -> None:
        reader = self.reader
        assert reader is not None
        try:
            messages = reader.feed(data)
        except Violation as exc:
            self.fail(exc.code, exc.reason)
            return
        for opcode, payload in messages:
            if opcode == wsframes.BINARY:
                message: bytes | str = payload
            elif opcode == wsframes.TEXT:
                try:
                    message = payload.decode()
                except UnicodeDecodeError:
                    self.fail(1007, "invalid utf-8")  # RFC 6455 8.1
                    return
            else:
                if not self._control(opcode, payload):
                    return
                continue
            if self.phase is not Phase.OPEN:
                continue  # closing: what the client still sends is dropped (RFC 6455 1.4)
            if self.busy:
                self._wait(message)
            else:
                self.server.frame(self, message)

    def _control(self, opcode: int, payload: bytes) -> bool:
        """A ping, pong or close from the client; False once the connection is done."""
        if opcode == wsframes.PING:
            self.write_frame(wsframes.frame(wsframes.PONG, payload), closing_too=True)
        elif opcode == wsframes.PONG:
            self.ping_sent = None
        else:
            try:
                code, _ = wsframes.parse_close(payload)
            except Violation as exc:
                self.fail(exc.code, exc.reason)
                return False
            if self.close_received is None:
                self.close_received = self.close_sent is None
            if self.close_sent is None:  # echo it (5.5.1), then the server closes the socket
                self.close_sent = code
                echo = wsframes.close_frame(code) if code != 1005 else wsframes.frame(8, b"")
                self.write_frame(echo, closing_too=True)
            self.phase = Phase.CLOSING
            self.flush()
            assert self.transport is not None
            self.transport.close()
            return False
        return True

    def _wait(self, message: bytes | str) -> None:
        if self._waiting is None:
            self._waiting = deque()
        self._waiting.append(message)
        if len(self._waiting) >= MAX_WAITING_FRAMES and self.transport is not None:
            self.transport.pause_reading()

    def done_waiting(self) -> None:
        """The frame this connection waited on is handled: the next ones go on."""
        self.busy = False
        waiting = self._waiting
        while waiting and not self.busy and self.phase is Phase.OPEN:
            self.server.frame(self, waiting.popleft())
        if not self.busy and self.transport is not None and self.phase is Phase.OPEN:
            self.transport.resume_reading()

    # Frames out

    def send(self, frame: dict[str, Any]) -> None:
        """An answer, an error, a welcome: encoded for this client, never dropped."""
        self.write_frame(frame_for(codec.encode(frame, self.encoding)))

    def session_message(self, seq: int, frame: bytes, dup: bool) -> None:
        """What the session's delivery hands over: a stored message, in seq order."""
        if dup:
            self.server.counters.redelivered += 1
        fields: dict[str, Any] = {"seq": seq, "dup": True} if dup else {"seq": seq}
        self.write_frame(frame_for(encode_stored(self, frame, fields)))

    def error(self, code: ErrorCode, message: str, frame_id: Any = None) -> None:
        self.send(protocol.error_frame(code, message, frame_id))

    def write_frame(self, frame: bytes, *, closing_too: bool = False) -> None:
        """A frame that is never dropped (QoS 1 and control); written at the end of the turn.
        Once closing, only the closing handshake's own frames (``closing_too``) go out."""
        if self.phase is Phase.OPEN or (closing_too and self.phase is Phase.CLOSING):
            if not self._out:
                self.server.dirty.append(self)
                self.server.flush_soon()
            self._out.append(frame)

    def queue_message(self, frame: bytes) -> bool:
        """A QoS 0 message; False when it displaced the oldest waiting one (dropped)."""
        if self.phase is not Phase.OPEN:
            return True
        if not self.paused:
            if not self._out:
                self.server.dirty.append(self)
                self.server.flush_soon()
            self._out.append(frame)
            return True
        held = self._held
        if held is None:
            held = self._held = deque()
        held.append(frame)
        if len(held) > self.server.config.message_queue_size:
            held.popleft()
            self.dropped += 1
            return False
        return True

    def flush(self) -> None:
        out = self._out
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    # Keepalive and closing

    def ping(self, now: float) -> None:
        if self.phase is Phase.OPEN:
            self.ping_sent = now
            self.write_frame(wsframes.PING_FRAME)

    def close(self, code: int, reason: str) -> None:
        """Send a close frame; the client answers with its own, then the socket closes."""
        if self.phase is not Phase.OPEN:
            if self.phase is not Phase.GONE and self.transport is not None:
                self.transport.close()
            return
        if self.closed_by is None:
            self.closed_by = reason
        self.close_sent = code
        self.write_frame(wsframes.close_frame(code, reason))
        self.phase = Phase.CLOSING
        self.flush()
        self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, self._abort)

    def fail(self, code: int, reason: str) -> None:
        """The client broke the protocol: a close frame saying how, and the socket closes."""
        if self.phase is Phase.GONE or self.transport is None:
            return
        if self.closed_by is None:
            self.closed_by = reason
        self.server.counters.closes[code] += 1
        if self.close_sent is None:
            self.close_sent = code
            self.write_frame(wsframes.close_frame(code, reason), closing_too=True)
        self.phase = Phase.CLOSING
        self.flush()
        self.transport.close()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def close_reason(self) -> str:
        """Why the connection ended, in words for a drone's offline status."""
        if self.closed_by == KEEPALIVE_REASON:
            return "ping timeout"
        if self.close_received:
            return "closed"  # the client closed first
        if self.close_sent is not None:
            return f"closed by the router ({self.close_sent})"
        return "connection lost"

    def add_subscriptions(self, filters: list[str]) -> None:
        if not isinstance(self.subscriptions, set):
            self.subscriptions = set()
        self.subscriptions.update(filters)

    def drop_subscription(self, topic_filter: str) -> bool:
        """Whether ``topic_filter`` was held (and is no longer)."""
        if topic_filter in self.subscriptions:
            self.subscriptions.discard(topic_filter)  # type: ignore[union-attr]
            return True
        return False


def _select_subprotocol(ws: ServerProtocol, offered: Any) -> Any:
    # Without a subprotocol the server speaks JSON (PROTOCOL.md, "Transport").
    for choice in codec.SUBPROTOCOLS:
        if choice in offered:
            return choice
    return None
