"""An asyncio client for the SentientEdge protocol (../shared/PROTOCOL.md), both encodings.

Example::

    drone = await Client.connect("ws://127.0.0.1:4000/ws", api_key=key)
    await drone.publish("drone/7/telemetry", {"lat": 52.1, "lon": 4.3})

    station = await Client.connect(url, token=jwt, encoding="json", reconnect=True)
    await station.subscribe("drone/+/telemetry")
    async for message in station.messages():
        print(message.topic, message.data)

Answers (``suback``, ``pong``, ``puback``) are matched to requests by ``id``; an ``error`` that
answers a request raises :class:`ServerError` from that request; other errors are kept in
``errors``.

With ``reconnect=True`` the client survives a lost connection: it reconnects (jittered backoff,
to whichever ingress answers), resumes its session, subscribes again if the session was gone,
and resends every QoS 1 publication not yet acknowledged, with the same ``id`` (the router
stores each id once). A QoS 1 publication answered ``unavailable`` (nothing stored: Redis or a
shard is away for a moment) is sent again, same id, with backoff, until its ``timeout``.
With ``auto_ack`` (the default) a QoS 1 message is acknowledged once
``recv`` has handed it to the application, and a redelivered message the application already
had (same session, ``seq`` not above the last one handed over) is not handed over again.

With ``fleet_key`` (the format of ``ENCRYPTION_KEY``: ``KID:BASE64,...``, the first key seals)
``publish`` seals ``data`` end to end (:mod:`sentientedge.sealing`): the router routes an
envelope it cannot read. ``null`` is sent as it is, so a retained ``null`` still clears a topic.
A received envelope that opens is handed over as the original ``data`` with
``Message.sealed`` true; one that does not open (unknown key id, tampered, replayed on another
topic) is handed over unchanged, the envelope itself, with ``sealed`` false and the reason in
``Message.seal_error``; plain data (presence, publishers without the key) arrives with
``sealed`` false and no ``seal_error``. An application that needs secrecy or authenticity reads
only messages with ``sealed`` true. ``send_frame`` sends frames as they are, never sealed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from sentientedge import codec
from sentientedge.codec import Encoding
from sentientedge.errors import ConnectionClosed, ConnectRejected, ServerError
from sentientedge.sealing import KeyRing, SealingError, is_envelope, open_data, seal_data

ACK_DELAY_S = 0.01
# Close codes after which reconnecting would be wrong: the router said no on purpose.
FINAL_CLOSE_CODES = {1008, 1009, 4000, 4001}  # 4001: reconnect with fresh credentials


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    data: Any
    qos: int
    sender: str
    ts: int
    received_at: float
    seq: int | None = None
    dup: bool = False
    retained: bool = False
    sealed: bool = False  # data arrived in an end-to-end envelope that opened with fleet_key
    seal_error: str | None = None  # why an envelope did not open (data is then the envelope)


@dataclass(frozen=True)
class Welcome:
    session: str
    resumed: bool
    server: str
    limits: dict[str, Any]


@dataclass(frozen=True)
class _Target:
    url: str
    headers: dict[str, str]
    query: dict[str, str]
    encoding: Encoding
    open_timeout: float
    ssl: Any = None


_CLOSED = object()


class Client:
    def __init__(
        self,
        ws: ClientConnection,
        welcome: Welcome,
        target: _Target,
        *,
        reconnect: bool = False,
        auto_ack: bool = True,
        fleet_key: str | KeyRing | None = None,
    ) -> None:
        self._ws = ws
        self._target = target
        self.encoding = target.encoding
        self.welcome = welcome
        self.reconnect = reconnect
        self.auto_ack = auto_ack
        self._fleet = _fleet_ring(fleet_key)
        self.reconnects = 0
        self._ids = itertools.count(1)
        self._pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._unacked_publishes: dict[str, dict[str, Any]] = {}  # id -> pub frame, in order
        self._subscriptions: list[str] = []
        self._messages: asyncio.Queue[Any] = asyncio.Queue()  # (session, Message) or _CLOSED
        self.errors: list[dict[str, Any]] = []
        self._error_event = asyncio.Event()
        self._handled_seq = 0
        self._acked_seq = 0
        self._ack_task: asyncio.Task[None] | None = None
        self._closing = False
        self.close_code: int | None = None
        self.close_reason = ""
        self._connected = asyncio.Event()
        self._connected.set()
        self._reader = asyncio.get_running_loop().create_task(self._run())

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        token: str | None = None,
        api_key: str | None = None,
        encoding: Encoding | str = Encoding.MSGPACK,
        session: str | None = None,
        use_query: bool = False,
        open_timeout: float = 10.0,
        headers: dict[str, str] | None = None,
        reconnect: bool = False,
        auto_ack: bool = True,
        ssl: Any = None,
        fleet_key: str | KeyRing | None = None,
    ) -> Client:
        """Open a connection and wait for ``welcome``.

        ``ssl``: an ``ssl.SSLContext`` for ``wss://`` URLs whose certificate the system does not
        trust by default (a router's own, say).

        Credentials go in headers, or in the query string with ``use_query`` (for clients that
        cannot set headers, such as browsers).

        ``fleet_key``: seal published ``data`` end to end and open received envelopes (see the
        module docstring); a malformed key raises ``ValueError`` before any connection opens.
        """
        fleet = _fleet_ring(fleet_key)
        extra: dict[str, str] = dict(headers or {})
        query: dict[str, str] = {}
        if token is not None:
            if use_query:
                query["token"] = token
            else:
                extra["Authorization"] = f"Bearer {token}"
        if api_key is not None:
            if use_query:
                query["api_key"] = api_key
            else:
                extra["X-API-Key"] = api_key
        target = _Target(url, extra, query, Encoding(encoding), open_timeout, ssl)
        ws, welcome = await _open(target, session)
        return cls(ws, welcome, target, reconnect=reconnect, auto_ack=auto_ack, fleet_key=fleet)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def session(self) -> str:
        return self.welcome.session

    @property
    def closed(self) -> bool:
        return self._reader.done()

    @property
    def transport(self) -> Any:
        """The current socket's transport (tests use it to cut a connection abruptly)."""
        return self._ws.transport

    # Sending

    async def send_frame(self, frame: dict[str, Any]) -> None:
        """Send a raw frame (tests and tools use this to speak the protocol directly)."""
        await self._send(codec.encode(frame, self.encoding))

    async def send_raw(self, data: bytes | str) -> None:
        await self._send(data)

    async def _send(self, data: bytes | str) -> None:
        if self.reconnect and not self._connected.is_set() and not self._closing:
            # During a reconnect, new frames wait: the unacknowledged ones go out first.
            await self._connected.wait()
        try:
            await self._ws.send(data)
        except websockets.ConnectionClosed as exc:
            if not self.reconnect:
                raise ConnectionClosed(exc.rcvd.code if exc.rcvd else None) from None
            # The frame is lost with the connection; QoS 1 publications are resent on resume.

    async def publish(
        self,
        topic: str,
        data: Any,
        *,
        qos: int = 0,
        retain: bool = False,
        id: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any] | None:
        """Publish; QoS 1 waits for ``puback`` and returns it (``id``, ``offset``).

        With ``fleet_key``, ``data`` other than ``None`` is sealed first (it must be JSON).
        """
        if self._fleet is not None and data is not None:
            data = seal_data(self._fleet, topic, data)
        frame: dict[str, Any] = {"op": "pub", "topic": topic, "data": data}
        if qos:
            frame["qos"] = qos
        if retain:
            frame["retain"] = True
        if qos == 1 and id is None:
            id = f"c{next(self._ids)}-{time.time_ns()}"
        if id is not None:
            frame["id"] = id
        if qos != 1:
            await self.send_frame(frame)
            return None
        assert id is not None
        self._unacked_publishes[id] = frame
        deadline = time.monotonic() + timeout
        delay = 0.05
        try:
            while True:
                try:
                    return await self._request(frame, max(0.1, deadline - time.monotonic()))
                except ServerError as exc:
                    # Nothing was stored (Redis or a shard is away for a moment): the same id
                    # again after a pause, until the timeout. The router stores an id once.
                    if exc.code != "unavailable" or time.monotonic() + delay > deadline:
                        raise
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)
        finally:
            self._unacked_publishes.pop(id, None)

    async def subscribe(self, *topics: str, timeout: float = 10.0) -> list[str]:
        reply = await self._request({"op": "sub", "topics": list(topics)}, timeout)
        granted = list(reply["topics"])
        self._subscriptions.extend(t for t in granted if t not in self._subscriptions)
        return granted

    async def unsubscribe(self, *topics: str, timeout: float = 10.0) -> list[str]:
        reply = await self._request({"op": "unsub", "topics": list(topics)}, timeout)
        self._subscriptions = [t for t in self._subscriptions if t not in topics]
        return list(reply["topics"])

    async def ping(self, timeout: float = 10.0) -> float:
        """Round trip through the ingress, in seconds."""
        start = time.perf_counter()
        await self._request({"op": "ping"}, timeout)
        return time.perf_counter() - start

    async def ack(self, seq: int) -> None:
        """Acknowledge every QoS 1 message up to ``seq`` (done for you with ``auto_ack``)."""
        await self.send_frame({"op": "ack", "seq": seq})
        self._acked_seq = max(self._acked_seq, seq)

    async def _request(self, frame: dict[str, Any], timeout: float) -> dict[str, Any]:
        if "id" not in frame:
            frame["id"] = f"r{next(self._ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[frame["id"]] = future
        try:
            await self.send_frame(frame)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(frame["id"], None)

    # Receiving

    async def _run(self) -> None:
        while True:
            await self._read()
            if self._closing or not self.reconnect or self.close_code in FINAL_CLOSE_CODES:
                break
            if not await self._reconnect():
                break
        self._fail_pending(everything=True)
        self._messages.put_nowait(_CLOSED)
        self._error_event.set()

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                self._dispatch(codec.decode_frame(raw))
        except websockets.ConnectionClosed:
            pass
        self.close_code = self._ws.close_code or 1006
        self.close_reason = self._ws.close_reason or ""
        self._connected.clear()
        # QoS 1 publications wait for the next connection; anything else fails now.
        self._fail_pending(everything=not self.reconnect)

    def _fail_pending(self, *, everything: bool) -> None:
        for frame_id, future in self._pending.items():
            if future.done() or (not everything and frame_id in self._unacked_publishes):
                continue
            future.set_exception(ConnectionClosed(self.close_code, self.close_reason))

    async def _reconnect(self) -> bool:
        delay = 0.1
        while not self._closing:
            await asyncio.sleep(delay * (0.5 + random.random()))
            try:
                ws, welcome = await _open(self._target, self.session)
            except ConnectRejected as exc:
                if exc.status in (401, 403):
                    return False  # credentials no longer good: retrying will not help
            except (OSError, asyncio.TimeoutError, websockets.WebSocketException, ConnectionClosed):
                pass
            else:
                self._ws = ws
                if welcome.session != self.session:  # the session expired: a fresh one
                    self._handled_seq = 0
                self._acked_seq = 0  # whatever was acked may not have arrived: ack again
                self.welcome = welcome
                self.reconnects += 1
                try:
                    if not welcome.resumed and self._subscriptions:
                        topics = list(self._subscriptions)
                        await ws.send(codec.encode({"op": "sub", "topics": topics}, self.encoding))
                    for frame in list(self._unacked_publishes.values()):
                        await ws.send(codec.encode(frame, self.encoding))
                except websockets.ConnectionClosed:
                    continue  # lost again already: next attempt
                self._connected.set()
                if self._handled_seq and self._ack_task is None:
                    self._ack_task = asyncio.get_running_loop().create_task(self._send_ack())
                return True
            delay = min(delay * 2, 2.0)
        return False

    def _dispatch(self, frame: dict[str, Any]) -> None:
        op = frame["op"]
        if op == "msg":
            self._messages.put_nowait((self.welcome.session, _message(frame, self._fleet)))
            return
        future = self._pending.get(frame.get("id"))
        if op == "error":
            if future is not None and not future.done():
                error = ServerError(frame["code"], frame.get("msg", ""), frame.get("id"))
                future.set_exception(error)
            else:
                self.errors.append(frame)
                self._error_event.set()
            return
        if future is not None and not future.done():
            future.set_result(frame)

    async def history(
        self,
        topic: str,
        since: int | None = None,
        until: int | None = None,
        limit: int | None = None,
        timeout: float = 30.0,
    ) -> list[Message]:
        """Archived messages of ``topic`` from this router, with this client's credentials
        (see :func:`fetch_history`)."""
        target = self._target
        headers = dict(target.headers)
        for name, header in (("token", "Authorization"), ("api_key", "X-API-Key")):
            if name in target.query:
                value = target.query[name]
                headers[header] = f"Bearer {value}" if name == "token" else value
        return await _history(
            target.url, headers, topic, since, until, limit, target.ssl, self._fleet, timeout
        )

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message; raises :class:`ConnectionClosed` once the connection is gone."""
        while True:
            if self._messages.empty():
                item = await asyncio.wait_for(self._messages.get(), timeout)
            else:  # wait_for costs a task; a firehose subscriber should not pay it per message
                item = self._messages.get_nowait()
            if item is _CLOSED:
                self._messages.put_nowait(_CLOSED)
                raise ConnectionClosed(self.close_code, self.close_reason)
            if self._handed_over(*item):
                return item[1]

    def recv_nowait(self) -> Message | None:
        while True:
            try:
                item = self._messages.get_nowait()
            except asyncio.QueueEmpty:
                return None
            if item is _CLOSED:
                self._messages.put_nowait(_CLOSED)
                return None
            if self._handed_over(*item):
                return item[1]

    def _handed_over(self, session: str, message: Message) -> bool:
        """Whether ``message`` goes to the application; acknowledges QoS 1 with ``auto_ack``."""
        if message.seq is None or not self.auto_ack or session != self.welcome.session:
            return True  # (from a session that is gone: nothing to dedupe or ack against)
        if message.seq > self._handled_seq:
            self._handled_seq = message.seq
            handed = True
        else:
            handed = False  # redelivered, and the application already had it: ack it again
            self._acked_seq = min(self._acked_seq, message.seq - 1)
        if self._ack_task is None:
            self._ack_task = asyncio.get_running_loop().create_task(self._send_ack())
        return handed

    async def _send_ack(self) -> None:
        try:
            await asyncio.sleep(ACK_DELAY_S)  # one ack for everything handed over meanwhile
            await self._connected.wait()
            if self._handled_seq > self._acked_seq:
                with contextlib.suppress(ConnectionClosed):
                    await self.ack(self._handled_seq)
        finally:
            self._ack_task = None

    async def messages(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.recv()
            except ConnectionClosed:
                return

    async def next_error(self, timeout: float) -> dict[str, Any]:
        """Wait for an unsolicited ``error`` frame and return it."""
        deadline = time.monotonic() + timeout
        while not self.errors:
            if self.closed:
                raise ConnectionClosed(self.close_code, self.close_reason)
            self._error_event.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no error frame arrived")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._error_event.wait(), remaining)
        return self.errors.pop(0)

    async def wait_closed(self, timeout: float = 10.0) -> int:
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        assert self.close_code is not None
        return self.close_code

    async def close(self, code: int = 1000) -> None:
        self._closing = True
        if self._ack_task is not None:  # the last acknowledgement goes out before we do
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._ack_task), 1.0)
        with contextlib.suppress(Exception):
            await self._ws.close(code)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._reader), 5.0)


def _message(frame: dict[str, Any], fleet: KeyRing | None) -> Message:
    data, sealed, seal_error = frame.get("data"), False, None
    if fleet is not None and is_envelope(data):
        try:
            data, sealed = open_data(fleet, frame["topic"], data), True
        except SealingError as exc:
            seal_error = str(exc)
    return Message(
        topic=frame["topic"],
        data=data,
        qos=frame.get("qos", 0),
        sender=frame.get("from", ""),
        ts=frame.get("ts", 0),
        received_at=time.time(),
        seq=frame.get("seq"),
        dup=bool(frame.get("dup", False)),
        retained=bool(frame.get("retained", False)),
        sealed=sealed,
        seal_error=seal_error,
    )


async def fetch_history(
    url: str,
    topic: str,
    *,
    since: int | None = None,
    until: int | None = None,
    limit: int | None = None,
    token: str | None = None,
    api_key: str | None = None,
    ssl: Any = None,
    fleet_key: str | KeyRing | None = None,
    timeout: float = 30.0,
) -> list[Message]:
    """Archived messages of ``topic`` (a topic or a filter) from ``GET /history`` on the router
    at ``url`` (its ``ws://`` or ``http://`` URL), oldest first. ``since`` and ``until`` are ms
    since the Unix epoch (default: the last hour); the caller's subscribe permission applies.
    Raises :class:`ConnectRejected` with the router's answer (404: no archive configured)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if api_key is not None:
        headers["X-API-Key"] = api_key
    return await _history(
        url, headers, topic, since, until, limit, ssl, _fleet_ring(fleet_key), timeout
    )


def http_url(url: str, path: str, query: str = "") -> str:
    """The router's HTTP address for ``path``, from its WebSocket URL (``wss`` -> ``https``)."""
    parts = urlsplit(url)
    scheme = "https" if parts.scheme in ("wss", "https") else "http"
    return urlunsplit((scheme, parts.netloc, path, query, ""))


async def _history(
    url: str,
    headers: dict[str, str],
    topic: str,
    since: int | None,
    until: int | None,
    limit: int | None,
    ssl: Any,
    fleet: KeyRing | None,
    timeout: float,
) -> list[Message]:
    import urllib.error
    import urllib.request

    params = {"topic": topic, "from": since, "to": until, "limit": limit}
    target = http_url(
        url, "/history", urlencode({k: v for k, v in params.items() if v is not None})
    )
    request = urllib.request.Request(target, headers=headers)

    def get() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=ssl) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    status, body = await asyncio.to_thread(get)
    document = json.loads(body or b"{}")
    if status != 200:
        raise ConnectRejected(status, document, {})
    return [_message(frame, fleet) for frame in document["messages"]]


def _fleet_ring(fleet_key: str | KeyRing | None) -> KeyRing | None:
    if fleet_key is None or isinstance(fleet_key, KeyRing):
        return fleet_key
    return KeyRing.from_setting(fleet_key, "fleet_key")


async def _open(target: _Target, session: str | None) -> tuple[ClientConnection, Welcome]:
    query = dict(target.query)
    if session is not None:
        query["session"] = session
    url = _with_query(target.url, query) if query else target.url
    try:
        ws = await connect(
            url,
            additional_headers=target.headers,
            subprotocols=[target.encoding.subprotocol],  # type: ignore[list-item]
            compression=None,
            open_timeout=target.open_timeout,
            max_size=None,
            # A subscriber to a whole fleet reads thousands of frames a second; a deeper
            # queue rides out scheduling hiccups instead of pushing back on the router.
            max_queue=1024,
            ping_interval=None,
            **({"ssl": target.ssl} if target.ssl is not None else {}),
        )
    except InvalidStatus as exc:
        response = exc.response
        try:
            body = json.loads(response.body or b"{}")
        except ValueError:
            body = {"error": (response.body or b"").decode("utf-8", "replace")}
        headers = dict(response.headers.raw_items())
        raise ConnectRejected(response.status_code, body, headers) from None
    try:
        first = codec.decode_frame(await asyncio.wait_for(ws.recv(), target.open_timeout))
    except websockets.ConnectionClosed as exc:
        raise ConnectionClosed(exc.rcvd.code if exc.rcvd else None) from None
    if first.get("op") != "welcome":
        await ws.close()
        raise ServerError("bad_frame", f"expected welcome, got {first.get('op')}")
    welcome = Welcome(first["session"], first["resumed"], first["server"], first["limits"])
    return ws, welcome


def _with_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&{urlencode(params)}" if parts.query else urlencode(params)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


async def history_frame(url: str, topic: str, **options: Any) -> Any:
    """:func:`fetch_history` as a pandas DataFrame, for notebooks (``await history_frame(...)``):
    one row per message, columns ``time`` (UTC), ``topic``, ``sender``, ``qos`` and the fields of
    ``data`` (``data.alt``, ``data.battery``, ...; a ``data`` column when it is not a map)."""
    import pandas as pd

    messages = await fetch_history(url, topic, **options)
    frame = pd.DataFrame(
        {
            "time": pd.to_datetime([m.ts for m in messages], unit="ms", utc=True),
            "topic": [m.topic for m in messages],
            "sender": [m.sender for m in messages],
            "qos": [m.qos for m in messages],
        }
    )
    data = [m.data for m in messages]
    if data and all(isinstance(d, dict) for d in data):
        return frame.join(pd.json_normalize(data).add_prefix("data."))
    frame["data"] = data
    return frame
