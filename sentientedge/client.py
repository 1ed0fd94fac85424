"""An asyncio client for the SentientEdge protocol (../shared/PROTOCOL.md), both encodings.

Example::

    async with await Client.connect("ws://127.0.0.1:4000/ws", api_key=key) as drone:
        await drone.publish("drone/7/telemetry", {"lat": 52.1, "lon": 4.3})

    station = await Client.connect(url, token=jwt, encoding="json")
    await station.subscribe("drone/+/telemetry")
    async for message in station.messages():
        print(message.topic, message.data)

Answers (``suback``, ``pong``, ``puback``) are matched to requests by ``id``; an ``error`` that
answers a request raises :class:`ServerError` from that request; other errors are kept in
``errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
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


@dataclass(frozen=True)
class Welcome:
    session: str
    resumed: bool
    server: str
    limits: dict[str, Any]


_CLOSED = object()


class Client:
    def __init__(self, ws: ClientConnection, encoding: Encoding, welcome: Welcome) -> None:
        self._ws = ws
        self.encoding = encoding
        self.welcome = welcome
        self._ids = itertools.count(1)
        self._pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._messages: asyncio.Queue[Any] = asyncio.Queue()
        self.errors: list[dict[str, Any]] = []
        self._error_event = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self._reader = asyncio.get_running_loop().create_task(self._read())

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
    ) -> Client:
        """Open a connection and wait for ``welcome``.

        Credentials go in headers, or in the query string with ``use_query`` (for clients that
        cannot set headers, such as browsers).
        """
        encoding = Encoding(encoding)
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
        if session is not None:
            query["session"] = session
        if query:
            url = _with_query(url, query)
        try:
            ws = await connect(
                url,
                additional_headers=extra,
                subprotocols=[encoding.subprotocol],  # type: ignore[list-item]
                compression=None,
                open_timeout=open_timeout,
                max_size=None,
                # A subscriber to a whole fleet reads thousands of frames a second; a deeper
                # queue rides out scheduling hiccups instead of pushing back on the router.
                max_queue=1024,
                ping_interval=None,
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
            first = codec.decode_frame(await asyncio.wait_for(ws.recv(), open_timeout))
        except websockets.ConnectionClosed as exc:
            raise ConnectionClosed(exc.rcvd.code if exc.rcvd else None) from None
        if first.get("op") != "welcome":
            await ws.close()
            raise ServerError("bad_frame", f"expected welcome, got {first.get('op')}")
        welcome = Welcome(first["session"], first["resumed"], first["server"], first["limits"])
        return cls(ws, encoding, welcome)

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
        return self.close_code is not None or self._reader.done()

    # Sending

    async def send_frame(self, frame: dict[str, Any]) -> None:
        """Send a raw frame (tests and tools use this to speak the protocol directly)."""
        await self._send(codec.encode(frame, self.encoding))

    async def send_raw(self, data: bytes | str) -> None:
        await self._send(data)

    async def _send(self, data: bytes | str) -> None:
        try:
            await self._ws.send(data)
        except websockets.ConnectionClosed as exc:
            raise ConnectionClosed(exc.rcvd.code if exc.rcvd else None) from None

    async def publish(
        self,
        topic: str,
        data: Any,
        *,
        qos: int = 0,
        retain: bool = False,
        id: str | None = None,
        timeout: float = 10.0,
    ) -> dict[str, Any] | None:
        """Publish; QoS 1 waits for ``puback`` and returns it (``id``, ``offset``)."""
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
        return await self._request(frame, timeout)

    async def subscribe(self, *topics: str, timeout: float = 10.0) -> list[str]:
        reply = await self._request({"op": "sub", "topics": list(topics)}, timeout)
        return list(reply["topics"])

    async def unsubscribe(self, *topics: str, timeout: float = 10.0) -> list[str]:
        reply = await self._request({"op": "unsub", "topics": list(topics)}, timeout)
        return list(reply["topics"])

    async def ping(self, timeout: float = 10.0) -> float:
        """Round trip through the ingress, in seconds."""
        start = time.perf_counter()
        await self._request({"op": "ping"}, timeout)
        return time.perf_counter() - start

    async def ack(self, seq: int) -> None:
        await self.send_frame({"op": "ack", "seq": seq})

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

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                self._dispatch(codec.decode_frame(raw))
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self._ws.close_code or 1006
            self.close_reason = self._ws.close_reason or ""
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionClosed(self.close_code, self.close_reason))
            self._messages.put_nowait(_CLOSED)
            self._error_event.set()

    def _dispatch(self, frame: dict[str, Any]) -> None:
        op = frame["op"]
        if op == "msg":
            self._messages.put_nowait(
                Message(
                    topic=frame["topic"],
                    data=frame.get("data"),
                    qos=frame.get("qos", 0),
                    sender=frame.get("from", ""),
                    ts=frame.get("ts", 0),
                    received_at=time.time(),
                    seq=frame.get("seq"),
                    dup=bool(frame.get("dup", False)),
                    retained=bool(frame.get("retained", False)),
                )
            )
            return
        future = self._pending.get(frame.get("id"))
        if op == "error":
            if future is not None and not future.done():
                future.set_exception(
                    ServerError(frame["code"], frame.get("msg", ""), frame.get("id"))
                )
            else:
                self.errors.append(frame)
                self._error_event.set()
            return
        if future is not None and not future.done():
            future.set_result(frame)

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message; raises :class:`ConnectionClosed` once the connection is gone."""
        if self._messages.empty():
            item = await asyncio.wait_for(self._messages.get(), timeout)
        else:  # wait_for costs a task; a firehose subscriber should not pay it per message
            item = self._messages.get_nowait()
        if item is _CLOSED:
            self._messages.put_nowait(_CLOSED)
            raise ConnectionClosed(self.close_code, self.close_reason)
        return item

    def recv_nowait(self) -> Message | None:
        try:
            item = self._messages.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if item is _CLOSED:
            self._messages.put_nowait(_CLOSED)
            return None
        return item

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
        with contextlib.suppress(Exception):
            await self._ws.close(code)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._reader), 5.0)


def _with_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&{urlencode(params)}" if parts.query else urlencode(params)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
