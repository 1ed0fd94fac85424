"""Lean WebSocket links and one shared ticker: how sentientedge.loadgen drives thousands of clients.

The load generator runs on the machine it measures, so it must cost the router as little CPU
as possible and must not add its own milliseconds to the latency it reports. The full
:class:`sentientedge.client.Client` (websockets' asyncio connection: a reader task per
connection, a coroutine and a lock per send) costs several times what the router spends on a
message. Here instead:

- :class:`Link` is an ``asyncio.Protocol``: websockets' sans-I/O ``ClientProtocol`` does the
  opening handshake (request, ``Sec-WebSocket-Accept``, subprotocol, and the refusals: 401,
  429, 503 with their bodies); after the ``101`` the link parses frames itself
  (:mod:`sentientedge.loadgen_wire`), many per read, all stamped with one receive time, and
  answers pings, close frames and QoS 1 deliveries (``ack``) itself. No task, no queue.
- A link resumes its session when its connection drops (``?session=ID``, jittered backoff),
  subscribes again if the session was gone, and resends its unacknowledged QoS 1
  publications with their ids, as ``Client(reconnect=True)`` does.
- :class:`Ticker` sends for a whole fleet from one timer: drones are grouped by phase
  (:class:`TickSchedule`), and each tick sends every due drone's frame in one go, instead of
  a task and an ``asyncio.sleep`` per drone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, cast
from urllib.parse import urlencode, urlsplit, urlunsplit

import msgpack
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake
from websockets.http11 import Response
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from sentientedge.errors import ConnectionClosed, ConnectRejected, ServerError
from sentientedge.loadgen_wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    FramingError,
    client_frame,
    close_payload,
    parse_close,
)

ACK_DELAY_S = 0.01  # one ack for every QoS 1 delivery in that time, as the full client does
RETRY_UNAVAILABLE_S = 0.1  # a QoS 1 publication answered `unavailable` goes again after ~this
CLOSE_TIMEOUT_S = 2.0
# Close codes after which reconnecting would be wrong: the router said no on purpose.
FINAL_CLOSE_CODES = {1008, 1009, 4000}
MAX_HANDSHAKE_BYTES = 65536
TICK_S = 0.001  # drones whose phases fall in the same millisecond send in the same tick

_unpackb = msgpack.unpackb
_json_loads = json.loads
_time = time.time


class Link:
    """One simulated client (drone, station): a WebSocket that survives drops.

    Subclasses handle deliveries in :meth:`on_message` (called with the decoded ``msg`` frame
    and the time its bytes were read) and acknowledged QoS 1 publications in
    :meth:`on_puback`. Everything runs on the event loop that called :meth:`open`.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        api_key: str | None = None,
        encoding: str = "msgpack",
        reconnect: bool = True,
        open_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.headers: dict[str, str] = {}
        if token is not None:
            self.headers["Authorization"] = f"Bearer {token}"
        if api_key is not None:
            self.headers["X-API-Key"] = api_key
        self.encoding = encoding
        self.reconnect = reconnect
        self.open_timeout = open_timeout
        # One key per link (see loadgen_wire): the router unmasks whatever the key.
        self.mask = os.urandom(4)
        self.session: str | None = None
        self.resumed = False
        self.reconnects = 0
        self.is_open = False  # welcomed and not dropped: frames may go out
        self.close_code: int | None = None
        self.close_reason = ""
        self.errors: dict[str, int] = {}  # unsolicited `error` frames by code
        self.subscriptions: list[str] = []
        self.transport: asyncio.Transport | None = None
        self._write: Callable[[bytes], object] = _nowhere  # the transport's write, while there
        self._connection: _Connection | None = None
        self._parser = FrameParser()
        self._welcome: asyncio.Future[dict[str, Any]] | None = None
        self._requests: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        # QoS 1 publications not yet acknowledged: id -> (first sent, the frame on the wire).
        self._unacked: dict[str, tuple[float, bytes]] = {}
        self._handled_seq = 0
        self._acked_seq = 0
        self._ack_timer: asyncio.TimerHandle | None = None
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self._reconnecting: asyncio.Task[None] | None = None
        self._closing = False
        self._sent_close = False
        self._finished: asyncio.Future[None] | None = None

    # Opening

    async def open(self) -> dict[str, Any]:
        """Connect and wait for ``welcome`` (returned); raises as ``Client.connect`` does."""
        loop = asyncio.get_running_loop()
        self._finished = loop.create_future()
        welcome = await self._open(None)
        self.is_open = True
        return welcome

    async def _open(self, session: str | None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        url = _with_query(self.url, {"session": session}) if session else self.url
        uri = parse_uri(url)
        connection = _Connection(self, ClientProtocol(uri, subprotocols=[_subprotocol(self)]))
        self._welcome = welcome = loop.create_future()
        self._parser = FrameParser()
        self._sent_close = False
        self.close_code = None
        self.close_reason = ""
        try:
            await asyncio.wait_for(self._connect(connection, uri), self.open_timeout)
            frame = await asyncio.wait_for(welcome, self.open_timeout)
        except BaseException:
            if connection.transport is not None:
                connection.transport.abort()
            if self._connection is connection:
                self._detach()
            raise
        self.session = frame["session"]
        self.resumed = bool(frame.get("resumed"))
        return frame

    async def _connect(self, connection: _Connection, uri: Any) -> None:
        loop = asyncio.get_running_loop()
        ssl: Any = True if uri.secure else None
        await loop.create_connection(lambda: connection, uri.host, uri.port, ssl=ssl)
        await connection.opened

    def _attach(self, connection: _Connection, rest: bytes) -> None:
        """The handshake succeeded: frames flow through this link from now on."""
        self._connection = connection
        self.transport = connection.transport
        if self.transport is not None:
            self._write = self.transport.write
        if rest:
            self._received(rest)

    def _detach(self) -> None:
        self._connection = None
        self.transport = None
        self._write = _nowhere
        self.is_open = False

    # Receiving: the hot path

    def _received(self, data: bytes) -> None:
        now = _time()  # one stamp for every frame of this read: they all arrived together
        try:
            frames = self._parser.feed(data)
        except FramingError as exc:
            self._fail(1002, str(exc))
            return
        raw = self.raw_messages
        for opcode, payload in frames:
            if opcode == OP_BINARY:
                if raw:
                    frame = _unpackb(payload, raw=True)
                    if frame.get(b"op") == b"msg":
                        self.on_message(frame, now)
                        continue
                    frame = _unpackb(payload)  # (a rare answer: with str keys after all)
                else:
                    frame = _unpackb(payload)
            elif opcode == OP_TEXT:
                frame = _json_loads(payload)
            else:
                self._control(opcode, payload)
                continue
            if frame["op"] == "msg":
                self.on_message(frame, now)
            else:
                self._answer(frame, now)

    # MessagePack deliveries reach on_message with bytes keys and strings (b"topic": b"a/b"):
    # for a link that only counts them, decoding no UTF-8 halves the cost of a frame.
    raw_messages = False

    def on_message(self, frame: dict[Any, Any], now: float) -> None:
        """A delivery (``op: msg``); QoS 1 ones should go through :meth:`take`."""
        if "seq" in frame:
            self.take(frame["seq"])

    def on_puback(self, ident: str, sent: float, now: float) -> None:
        """QoS 1 publication ``ident``, first sent at ``sent``, was acknowledged at ``now``."""

    def _answer(self, frame: dict[str, Any], now: float) -> None:
        op = frame["op"]
        if op == "puback":
            ident: str = frame.get("id", "")
            entry = self._unacked.pop(ident, None)
            if entry is not None:
                self.on_puback(ident, entry[0], now)
        elif op == "welcome":
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_result(frame)
        elif op == "error":
            self._error(frame)
        else:  # suback, unsuback, pong
            future = self._requests.pop(frame.get("id"), None)
            if future is not None and not future.done():
                future.set_result(frame)

    def _error(self, frame: dict[str, Any]) -> None:
        code = str(frame.get("code"))
        ident = frame.get("id")
        future = self._requests.pop(ident, None)
        if future is not None:
            if not future.done():
                future.set_exception(ServerError(code, str(frame.get("msg", "")), ident))
            return
        self.errors[code] = self.errors.get(code, 0) + 1
        if isinstance(ident, str) and ident in self._unacked:
            if code == "unavailable":  # nothing was stored: the same id again, shortly
                if ident not in self._retries:
                    delay = RETRY_UNAVAILABLE_S * (0.5 + random.random())
                    loop = asyncio.get_running_loop()
                    self._retries[ident] = loop.call_later(delay, self._retry, ident)
            else:  # refused for good (rate_limited, forbidden, ...): counted in errors
                del self._unacked[ident]

    def _retry(self, ident: str) -> None:
        self._retries.pop(ident, None)
        entry = self._unacked.get(ident)
        if entry is not None and self.is_open:
            self.write(entry[1])

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self.write(client_frame(OP_PONG, payload, self.mask))
        elif opcode == OP_CLOSE:
            self.close_code, self.close_reason = parse_close(payload)
            self.is_open = False
            if not self._sent_close:  # echo it; the server then closes the TCP connection
                code = self.close_code if self.close_code not in (1005, 1006) else None
                echo = close_payload(code) if code is not None else b""
                self.write(client_frame(OP_CLOSE, echo, self.mask))
                self._sent_close = True
            if self.transport is not None:  # a server that never closes its end
                asyncio.get_running_loop().call_later(
                    CLOSE_TIMEOUT_S, _abort, self.transport, self._connection
                )
        # pongs answer nothing we sent (the router's own ping op is a frame, not a control)

    def _fail(self, code: int, reason: str) -> None:
        if self.transport is not None and not self._sent_close:
            self.write(client_frame(OP_CLOSE, close_payload(code, reason[:100]), self.mask))
            self._sent_close = True
        if self.transport is not None:
            self.transport.abort()

    # QoS 1 deliveries: dedupe and acknowledge, as the full client's auto_ack

    def take(self, seq: int) -> bool:
        """Whether QoS 1 delivery ``seq`` is new to this session; schedules its ``ack``."""
        if seq > self._handled_seq:
            self._handled_seq = seq
            fresh = True
        else:  # redelivered, and handled already: acknowledge it again
            self._acked_seq = min(self._acked_seq, seq - 1)
            fresh = False
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY_S, self._send_ack)
        return fresh

    def _send_ack(self) -> None:
        self._ack_timer = None
        if self._handled_seq > self._acked_seq and self.transport is not None:
            self.send_frame({"op": "ack", "seq": self._handled_seq})
            self._acked_seq = self._handled_seq

    # Sending

    def write(self, wire: bytes) -> None:
        self._write(wire)

    def send_frame(self, frame: dict[str, Any]) -> None:
        if self.encoding == "json":
            payload = json.dumps(frame, separators=(",", ":")).encode()
            self.write(client_frame(OP_TEXT, payload, self.mask))
        else:
            self.write(client_frame(OP_BINARY, msgpack.packb(frame), self.mask))

    def publish_durable(self, topic: str, data: Any, ident: str, now: float) -> None:
        """A QoS 1 publication: resent on resume and after ``unavailable`` until its puback."""
        frame = {"op": "pub", "topic": topic, "data": data, "qos": 1, "id": ident}
        if self.encoding == "json":
            payload = json.dumps(frame, separators=(",", ":")).encode()
            wire = client_frame(OP_TEXT, payload, self.mask)
        else:
            wire = client_frame(OP_BINARY, msgpack.packb(frame), self.mask)
        self.track(ident, now, wire)

    def track(self, ident: str, now: float, wire: bytes) -> None:
        """Send ``wire`` (QoS 1 publication ``ident``) and keep it until its puback."""
        self._unacked[ident] = (now, wire)
        if self.is_open:
            self.write(wire)

    @property
    def gone(self) -> bool:
        """Closed for good: by :meth:`close`, or the router said no more (4000, 1008, 401)."""
        return self._finished is not None and self._finished.done()

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    async def request(self, frame: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        frame = {**frame, "id": f"r{next(self._ids)}"}
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[frame["id"]] = future
        try:
            self.send_frame(frame)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._requests.pop(frame["id"], None)

    async def subscribe(self, *topics: str, timeout: float = 10.0) -> list[str]:
        reply = await self.request({"op": "sub", "topics": list(topics)}, timeout)
        granted = list(reply["topics"])
        self.subscriptions.extend(t for t in granted if t not in self.subscriptions)
        return granted

    # Losing the connection, resuming, closing

    def drop(self) -> None:
        """Cut the connection abruptly, as a failing radio link would (the link resumes)."""
        if self.transport is not None:
            self.is_open = False
            self.transport.abort()

    def _lost(self, connection: _Connection) -> None:
        if connection is not self._connection:
            return  # an attempt that never got through; _open saw its failure
        self._detach()
        if self.close_code is None:
            self.close_code = 1006
        for future in self._requests.values():
            if not future.done():
                future.set_exception(ConnectionClosed(self.close_code, self.close_reason))
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(ConnectionClosed(self.close_code, self.close_reason))
            return  # still opening: _open raises, its caller decides
        if self._closing or not self.reconnect or self.close_code in FINAL_CLOSE_CODES:
            self._finish()
        elif self._reconnecting is None:
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.1
        try:
            while not self._closing:
                await asyncio.sleep(delay * (0.5 + random.random()))
                try:
                    welcome = await self._open(self.session)
                except ConnectRejected as exc:
                    if exc.status in (401, 403):
                        break  # credentials no longer good: retrying will not help
                except (OSError, asyncio.TimeoutError, ConnectionClosed, InvalidHandshake):
                    pass
                else:
                    self.reconnects += 1
                    self._resumed(welcome)
                    return
                delay = min(delay * 2, 2.0)
            self._finish()
        finally:
            self._reconnecting = None

    def _resumed(self, welcome: dict[str, Any]) -> None:
        if not self.resumed:  # the session was gone: a fresh one, subscribed again
            self._handled_seq = 0
            if self.subscriptions:
                self.send_frame({"op": "sub", "topics": list(self.subscriptions)})
        self._acked_seq = 0  # whatever was acked may not have arrived: ack again
        for _, wire in list(self._unacked.values()):
            self.write(wire)
        if self._handled_seq and self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY_S, self._send_ack)
        self.is_open = True

    def _finish(self) -> None:
        self.is_open = False
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    async def close(self, code: int = 1000) -> None:
        """Close (the last ``ack`` goes out first); returns once the connection is gone."""
        self._closing = True
        for handle in self._retries.values():
            handle.cancel()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(BaseException):
                await self._reconnecting
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._send_ack()
        if self.transport is None:
            self._finish()
            return
        if not self._sent_close:
            self.write(client_frame(OP_CLOSE, close_payload(code), self.mask))
            self._sent_close = True
        self.is_open = False
        if self._finished is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._finished), CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            if self.transport is not None:
                self.transport.abort()


class _Connection(asyncio.Protocol):
    """One TCP connection of a link: the opening handshake, then every read straight to the link."""

    def __init__(self, link: Link, handshake: ClientProtocol) -> None:
        self.link = link
        self.handshake = handshake
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buffer = b""
        self._refused = False
        self._open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but have its methods)
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small frames go out at once (asyncio and uvloop set it too)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = self.handshake.connect()
        for name, value in self.link.headers.items():
            request.headers[name] = value
        self.handshake.send_request(request)
        self.transport.write(b"".join(self.handshake.data_to_send()))

    def data_received(self, data: bytes) -> None:
        if self._open:
            self.link._received(data)
        elif self._refused:
            self.handshake.receive_data(data)
            self._check_refusal()
        else:
            self._handshake_data(data)

    def _handshake_data(self, data: bytes) -> None:
        buffer = self._buffer + data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            self._buffer = buffer
            if len(buffer) > MAX_HANDSHAKE_BYTES:
                self._give_up(InvalidHandshake("handshake response too long"))
            return
        if buffer[9:12] != b"101":  # refused: let the handshake read the body that says why
            self._refused = True
            self.handshake.receive_data(buffer)
            self._check_refusal()
            return
        # Only the response head goes to the sans-I/O protocol: the frames after it are ours.
        self.handshake.receive_data(buffer[: end + 4])
        self.handshake.events_received()
        if self.handshake.handshake_exc is not None:
            self._give_up(self.handshake.handshake_exc)
            return
        self._open = True
        self._buffer = b""
        # Only the refusal path reads it again: 10,000 idle links should not each keep one.
        del self.handshake
        if not self.opened.done():
            self.opened.set_result(None)
        self.link._attach(self, buffer[end + 4 :])

    def _check_refusal(self) -> None:
        for event in self.handshake.events_received():
            if isinstance(event, Response):
                try:
                    body = json.loads(event.body or b"{}")
                except ValueError:
                    body = {"error": bytes(event.body or b"").decode("utf-8", "replace")}
                headers = dict(event.headers.raw_items())
                self._give_up(ConnectRejected(event.status_code, body, headers))
                return

    def _give_up(self, exc: BaseException) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._open:
            if self._refused:  # a refusal whose body ends with the connection
                self.handshake.receive_eof()
                self._check_refusal()
            if not self.opened.done():
                self.opened.set_exception(ConnectionClosed(1006, "closed during the handshake"))
            return
        self.link._lost(self)


def _nowhere(wire: bytes) -> None:
    """Where frames go while a link has no connection: nowhere (QoS 1 ones are resent)."""


def _abort(transport: asyncio.Transport, connection: _Connection | None) -> None:
    if connection is not None and connection.transport is transport and not transport.is_closing():
        transport.abort()


def _subprotocol(link: Link) -> Subprotocol:
    return Subprotocol(f"se1.{link.encoding}")


def _with_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&{urlencode(params)}" if parts.query else urlencode(params)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


# One timer for a whole fleet


class TickSchedule:
    """When each drone sends: grouped by phase, each group due at ``start + offset + k * period``.

    Phases (seconds into the period) are rounded down to ``slot_s``, so drones within the same
    slot share a tick. ``pop_due(now)`` returns, in time order, every ``(k, members)`` due by
    ``now`` and not yet returned (all of them after a stall: a late tick does not slow a drone
    down); nothing is due at or after ``end``.
    """

    def __init__(
        self,
        start: float,
        period: float,
        end: float,
        phases: Sequence[float],
        slot_s: float = TICK_S,
    ) -> None:
        slots: dict[int, list[int]] = {}
        for member, phase in enumerate(phases):
            slot = min(int(phase / slot_s), max(0, int(period / slot_s) - 1))
            slots.setdefault(slot, []).append(member)
        order = sorted(slots)
        self.start = start
        self.period = period
        self.end = end
        self.offsets = [slot * slot_s for slot in order]
        self.groups = [slots[slot] for slot in order]
        self._tick = 0
        self._index = 0

    def next_due(self) -> float | None:
        if not self.groups:
            return None
        due = self.start + self._tick * self.period + self.offsets[self._index]
        return due if due < self.end else None

    def pop_due(self, now: float) -> list[tuple[int, list[int]]]:
        due: list[tuple[int, list[int]]] = []
        while True:
            at = self.next_due()
            if at is None or at > now:
                return due
            due.append((self._tick, self.groups[self._index]))
            self._index += 1
            if self._index == len(self.groups):
                self._index = 0
                self._tick += 1


class Ticker:
    """Calls ``fire(k, members)`` as each group of a :class:`TickSchedule` falls due.

    One timer for the whole fleet. Event-loop timers have millisecond resolution, so a group
    due within ``slack_s`` counts as due: firing half a millisecond early costs nothing
    (every message is stamped when it is written), spinning until the exact time would.
    """

    def __init__(
        self,
        schedule: TickSchedule,
        fire: Callable[[int, list[int]], None],
        slack_s: float = TICK_S / 2,
    ) -> None:
        self.schedule = schedule
        self.fire = fire
        self.slack_s = slack_s
        self._handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self.done.done():
            self.done.set_result(None)

    def _run(self) -> None:
        self._handle = None
        for tick, members in self.schedule.pop_due(_time() + self.slack_s):
            self.fire(tick, members)
        self._arm()

    def _arm(self) -> None:
        due = self.schedule.next_due()
        if due is None:
            self.stop()
            return
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(max(0.0, due - _time()), self._run)


__all__ = ["Link", "TickSchedule", "Ticker"]
