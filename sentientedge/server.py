"""The ingress: an asyncio ``websockets`` server that terminates client connections.

This is the one module of ``sentientedge`` that opens sockets. It knows nothing of Ray: the
topic shards are reached through :class:`ShardLinks`, whose transport the ingress actor injects.

Rules for this module:
- Credentials and limits are checked in the handshake hook (``process_request``), so a bad token
  or a full server is an HTTP answer (401, 429, 503) and no WebSocket is opened.
- A frame costs no Ray call of its own: publications go into a per-shard :class:`Channel`.
- A client's outgoing traffic has two queues: control frames (answers, errors) that are never
  dropped, and messages, bounded by ``MESSAGE_QUEUE_SIZE``, whose oldest QoS 0 entries go first.
- Nothing a client sends closes its connection except what PROTOCOL.md names: a frame that is too
  large (1009), too many bad frames or far over the rate limit (1008).
"""

from __future__ import annotations

import asyncio
import http
import itertools
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import websockets
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import State

from sentientedge import codec, protocol, routing
from sentientedge.auth import Credentials, Identity, Role, authenticate, verify_jwt
from sentientedge.channel import UNPACED, CallPacer, Channel, Send, next_request_id
from sentientedge.codec import Encoding
from sentientedge.config import Config
from sentientedge.errors import (
    AuthError,
    Forbidden,
    ProtocolError,
    RouterUnavailable,
)
from sentientedge.metrics import IngressCollector, IngressCounters, make_registry, render
from sentientedge.protocol import CloseCode, ErrorCode
from sentientedge.ratelimit import BadFrameGuard, RateGuard, Verdict
from sentientedge.ring import HashRing
from sentientedge.store import Store
from sentientedge.topics import TopicTrie, has_wildcard, placement_key
from sentientedge.virtual import ring_key, session_ring_key

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 5.0
SUBSCRIBE_TIMEOUT_S = 10.0
RETRY_AFTER_S = 5


def now_ms() -> int:
    return int(time.time() * 1000)


class ShardLinks:
    """The ingress's view of the topic shards: the ring and one channel per shard."""

    def __init__(
        self, shards: list[str], make_send: Callable[[str], Send], pacer: CallPacer = UNPACED
    ) -> None:
        self.ring = HashRing(shards)
        self._make_send = make_send
        self._pacer = pacer
        self._channels: dict[str, Channel] = {}

    @property
    def shards(self) -> tuple[str, ...]:
        return self.ring.nodes

    def channel(self, shard: str) -> Channel:
        found = self._channels.get(shard)
        if found is None:
            found = self._channels[shard] = Channel(
                shard, self._make_send(shard), pacer=self._pacer
            )
        return found

    def owner_channel(self, key: str) -> Channel:
        return self.channel(self.ring.owner(key))

    def channels(self) -> list[Channel]:
        return [self.channel(shard) for shard in self.shards]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


@dataclass
class Admission:
    """What the handshake established, handed to the connection handler."""

    identity: Identity
    connection_id: str
    session_id: str


class ClientConnection:
    """One client's WebSocket as the ingress sees it."""

    def __init__(
        self,
        ingress: IngressServer,
        ws: ServerConnection,
        admission: Admission,
        encoding: Encoding,
    ) -> None:
        config = ingress.config
        self.ingress = ingress
        self.ws = ws
        self.identity = admission.identity
        self.sender = admission.identity.subject
        self.connection_id = admission.connection_id
        self.session_id = admission.session_id
        self.encoding = encoding
        self.subscriptions: set[str] = set()
        self.rate = (
            RateGuard.for_drone(config.drone_rate_hz)
            if self.identity.is_drone
            else RateGuard.for_person(config.rate_limit_max)
        )
        self.bad_frames = BadFrameGuard()
        self._control: deque[bytes | str] = deque()
        self._messages: deque[bytes | str] = deque()
        self._queue_size = config.message_queue_size
        self._writer: asyncio.Task[None] | None = None
        self._may_publish: dict[str, bool] = {}
        self._last_queue_full_told = 0.0
        self.dropped = 0

    # Outgoing
    #
    # Frames go straight to the socket while the client keeps up: a batch from a shard becomes
    # one transport.write per connection. Only while the client reads too slowly (the transport
    # paused writing above its high-water mark) do messages wait in ``_messages``, bounded by
    # MESSAGE_QUEUE_SIZE, oldest dropped first. So the bound counts how far a slow subscriber
    # is behind, not how many messages happened to arrive in one batch.

    def send_frame(self, frame: dict[str, Any]) -> None:
        self._control.append(codec.encode(frame, self.encoding))
        self.flush()

    def queue_message(self, encoded: bytes | str) -> None:
        """Queue a message; the caller flushes once it has queued a whole batch."""
        self._messages.append(encoded)

    def flush(self) -> int:
        """Write what is queued if the client keeps up; return how many messages were dropped."""
        if self._writer is None:
            if self.ws.paused:
                self._writer = asyncio.get_running_loop().create_task(self._write_when_drained())
            else:
                self._write_queued()
        excess = len(self._messages) - self._queue_size
        if excess <= 0:
            return 0
        for _ in range(excess):
            self._messages.popleft()
        self.dropped += excess
        return excess

    def _write_queued(self) -> None:
        """Hand every queued frame to the sans-I/O protocol, then the socket, in one write."""
        control, messages, ws = self._control, self._messages, self.ws
        protocol_ = ws.protocol
        if protocol_.state is not State.OPEN:
            control.clear()
            messages.clear()
            return
        for frames in (control, messages):
            while frames:
                frame = frames.popleft()
                if type(frame) is bytes:
                    protocol_.send_binary(frame)
                else:
                    protocol_.send_text(frame.encode())  # type: ignore[union-attr]
        chunks = protocol_.data_to_send()
        if all(chunks):
            ws.transport.write(b"".join(chunks))
        else:  # an empty chunk asks for a half-close; websockets' own send_data does that
            protocol_.writes[:0] = chunks
            ws.send_data()

    async def _write_when_drained(self) -> None:
        try:
            while self._control or self._messages:
                await self.ws.drain()
                self._write_queued()
        except Exception:  # the connection is gone; its handler cleans up
            self._control.clear()
            self._messages.clear()
        finally:
            self._writer = None

    def error(self, code: ErrorCode, message: str, frame_id: Any = None) -> None:
        self.send_frame(protocol.error_frame(code, message, frame_id))

    # Incoming

    def may_publish(self, topic: str) -> bool:
        allowed = self._may_publish.get(topic)
        if allowed is None:
            if len(self._may_publish) > 4096:
                self._may_publish.clear()
            allowed = self._may_publish[topic] = self.identity.permissions.can_publish(topic)
        return allowed

    def tell_queue_full(self, frame_id: Any) -> None:
        now = time.monotonic()
        if now - self._last_queue_full_told >= 1.0:
            self._last_queue_full_told = now
            self.error(ErrorCode.QUEUE_FULL, "router backlog full, message dropped", frame_id)


class IngressServer:
    def __init__(
        self,
        config: Config,
        name: str,
        shards: ShardLinks,
        store: Store,
        cluster_status: Callable[[], Awaitable[dict[str, Any]]],
    ) -> None:
        config.require_secrets()
        self.config = config
        self.name = name
        self.shards = shards
        self.store = store
        self._cluster_status = cluster_status
        self._server: Server | None = None
        self._admissions: dict[ServerConnection, Admission] = {}
        self.connections: dict[str, ClientConnection] = {}
        self.local = TopicTrie[ClientConnection]()
        self._registrations: dict[str, asyncio.Future[Any]] = {}
        self._connection_ids = itertools.count(1)
        self._epoch = uuid.uuid4().hex[:8]
        self.counters = IngressCounters()
        self._registry = make_registry(
            IngressCollector(name, self.counters, lambda: len(self.connections))
        )
        self._health: dict[str, Any] = {"redis": "unknown", "shards": {}}
        self._monitor: asyncio.Task[None] | None = None
        self.draining = False

    # Life cycle

    async def start(self) -> None:
        if self._server is not None:
            return
        config = self.config
        self._server = await serve(
            self._handle,
            config.host,
            config.port,
            process_request=self._process_request,
            subprotocols=[codec.Encoding.MSGPACK.subprotocol, codec.Encoding.JSON.subprotocol],  # type: ignore[list-item]
            select_subprotocol=_select_subprotocol,
            compression=None,
            max_size=config.max_frame_bytes,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            reuse_port=True,
            backlog=4096,
            server_header=None,
        )
        self._monitor = asyncio.get_running_loop().create_task(self._watch_health())
        log.info("%s listening on %s:%d", self.name, config.host, config.port)

    async def stop(self, code: int = CloseCode.GOING_AWAY) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        if self._server is not None:
            self._server.close(close_connections=True, code=code)
            await self._server.wait_closed()
            self._server = None
        await self.shards.close()
        await self.store.close()

    # Handshake

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        query = dict(parse_qsl(url.query))
        if url.path == "/health":
            return self._health_response()
        if url.path == "/metrics":
            return _response(
                http.HTTPStatus.OK, render(self._registry), "text/plain; version=0.0.4"
            )
        if url.path == "/admin/cluster-status":
            return await self._admin_cluster_status(request.headers, query)
        if url.path != "/ws":
            return self._reject(http.HTTPStatus.NOT_FOUND, "not_found", f"no such path: {url.path}")
        if (
            self.draining
            or len(self.connections) + len(self._admissions) >= self.config.max_ws_connections
        ):
            return self._reject(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "unavailable",
                "server draining" if self.draining else "server full",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        try:
            identity = await self._authenticate(request.headers, query)
        except AuthError as exc:
            return self._reject(http.HTTPStatus.UNAUTHORIZED, "unauthorized", exc.reason)
        connection_id = f"{self.name}.{self._epoch}.{next(self._connection_ids)}"
        channel = self.shards.owner_channel(ring_key(identity.principal))
        request_id = next_request_id()
        try:
            granted = await asyncio.wait_for(
                channel.request((routing.CONNECT, request_id, identity.principal, connection_id)),
                HANDSHAKE_TIMEOUT_S,
            )
        except (RouterUnavailable, asyncio.TimeoutError):
            return self._reject(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "unavailable",
                "router not ready",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        if not granted:
            limit = (
                self.config.max_connections_per_drone
                if identity.is_drone
                else self.config.max_connections_per_user
            )
            return self._reject(
                http.HTTPStatus.TOO_MANY_REQUESTS,
                "too_many_connections",
                f"{identity.principal} already has {limit} connections",
            )
        self._admissions[ws] = Admission(identity, connection_id, uuid.uuid4().hex)
        # Whatever happens to the socket from here on, the connection is counted until it is lost.
        ws.connection_lost_waiter.add_done_callback(
            lambda _: self._release(identity.principal, connection_id, ws)
        )
        self.counters.handshakes[101] += 1
        return None

    async def _authenticate(self, headers: Headers, query: dict[str, str]) -> Identity:
        credentials = Credentials.from_request(headers, query)
        config = self.config
        assert config.jwt_secret is not None and config.api_key_secret is not None
        identity = authenticate(credentials, config.jwt_secret, config.api_key_secret)
        if (
            credentials.api_key
            and identity.credential_id
            and await self.store.is_revoked(identity.credential_id)
        ):
            raise AuthError("api key revoked")
        return identity

    def _release(self, principal: str, connection_id: str, ws: ServerConnection) -> None:
        self._admissions.pop(ws, None)
        self.shards.owner_channel(ring_key(principal)).push(
            (routing.DISCONNECT, principal, connection_id)
        )

    def _reject(
        self,
        status: http.HTTPStatus,
        error: str,
        reason: str,
        headers: dict[str, str] | None = None,
    ) -> Response:
        self.counters.handshakes[status.value] += 1
        body = json.dumps({"error": error, "reason": reason}).encode()
        return _response(status, body, "application/json", headers)

    # HTTP endpoints

    def health(self) -> dict[str, Any]:
        shards = self._health["shards"]
        healthy = (
            self._health["redis"] == "ok"
            and bool(shards)
            and all(state == "ok" for state in shards.values())
        )
        return {
            "status": "ok" if healthy else "degraded",
            "server": self.name,
            "connections": len(self.connections),
            "draining": self.draining,
            "redis": self._health["redis"],
            "shards": dict(shards),
        }

    def _health_response(self) -> Response:
        report = self.health()
        status = (
            http.HTTPStatus.OK if report["status"] == "ok" else http.HTTPStatus.SERVICE_UNAVAILABLE
        )
        return _response(status, json.dumps(report).encode(), "application/json")

    async def _watch_health(self) -> None:
        while True:
            self._health["redis"] = "ok" if await self.store.ping() else "unreachable"
            checks = {
                channel.destination: channel.request((routing.ECHO, next_request_id()))
                for channel in self.shards.channels()
            }
            for shard, future in checks.items():
                try:
                    await asyncio.wait_for(future, 2.0)
                    self._health["shards"][shard] = "ok"
                except (RouterUnavailable, asyncio.TimeoutError):
                    self._health["shards"][shard] = "unreachable"
            await asyncio.sleep(1.0)

    async def _admin_cluster_status(self, headers: Headers, query: dict[str, str]) -> Response:
        try:
            credentials = Credentials.from_request(headers, query)
            if not credentials.token:
                raise AuthError("admin endpoints need Authorization: Bearer <admin token>")
            assert self.config.jwt_secret is not None
            identity = verify_jwt(credentials.token, self.config.jwt_secret)
        except AuthError as exc:
            return self._reject(http.HTTPStatus.UNAUTHORIZED, "unauthorized", exc.reason)
        if identity.role is not Role.ADMIN:
            return self._reject(http.HTTPStatus.FORBIDDEN, "forbidden", "admin role required")
        try:
            report = await asyncio.wait_for(self._cluster_status(), 10.0)
        except Exception as exc:  # the controller may be restarting; say so, don't crash
            log.warning("cluster status failed: %s", exc)
            return self._reject(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "unavailable", "cluster status unavailable"
            )
        return _response(http.HTTPStatus.OK, json.dumps(report).encode(), "application/json")

    # Connections

    async def _handle(self, ws: ServerConnection) -> None:
        admission = self._admissions.pop(ws, None)
        if admission is None:  # released before the handler ran
            return
        conn = ClientConnection(self, ws, admission, Encoding.from_subprotocol(ws.subprotocol))
        self.connections[conn.connection_id] = conn
        config = self.config
        session_channel = self.shards.owner_channel(session_ring_key(conn.session_id))
        session_channel.push(
            (routing.SESSION_OPEN, conn.session_id, conn.identity.principal, conn.connection_id)
        )
        rate_hz = config.drone_rate_hz if conn.identity.is_drone else config.rate_limit_max / 60.0
        conn.send_frame(
            protocol.welcome_frame(
                conn.session_id,
                False,
                self.name,
                config.max_frame_bytes,
                rate_hz,
                config.message_queue_size,
            )
        )
        try:
            async for raw in ws:
                close = await self._on_frame(conn, raw)
                if close is not None:
                    self.counters.closes[close[0]] += 1
                    await ws.close(close[0], close[1])
                    break
        except websockets.ConnectionClosed:
            pass
        finally:
            del self.connections[conn.connection_id]
            for topic_filter in list(conn.subscriptions):
                self._drop_local(topic_filter, conn)
            session_channel.push((routing.SESSION_CLOSE, conn.session_id))
            if ws.close_code == CloseCode.TOO_LARGE:
                self.counters.closes[CloseCode.TOO_LARGE] += 1

    async def _on_frame(self, conn: ClientConnection, raw: bytes | str) -> tuple[int, str] | None:
        """Handle one client frame; returns (close code, reason) when the client must go."""
        counters = self.counters
        try:
            op = protocol.parse_client_frame(codec.decode_frame(raw))
            if type(op) is not protocol.Ack:
                verdict = conn.rate.check()
                if verdict is not Verdict.PASS:
                    counters.received["rate_limited"] += 1
                    if verdict is Verdict.CLOSE:
                        return CloseCode.POLICY, "far over the rate limit"
                    if verdict is Verdict.DROP_AND_TELL:
                        conn.error(
                            ErrorCode.RATE_LIMITED,
                            "over the rate limit, message dropped",
                            getattr(op, "id", None),
                        )
                    return None
            if type(op) is protocol.Publish:
                self._publish(conn, op)
            elif type(op) is protocol.Subscribe:
                await self._subscribe(conn, op)
            elif type(op) is protocol.Unsubscribe:
                await self._unsubscribe(conn, op)
            elif type(op) is protocol.Ping:
                conn.send_frame(protocol.pong_frame(op.id))
            # Ack: QoS 1 delivery positions arrive with the delivery-guarantees work.
            return None
        except ProtocolError as exc:
            counters.received[exc.code] += 1
            conn.send_frame(protocol.error_for(exc))
            if conn.bad_frames.record():
                return CloseCode.POLICY, "too many bad frames"
            return None

    def _publish(self, conn: ClientConnection, op: protocol.Publish) -> None:
        topic = op.topic
        if not conn.may_publish(topic):
            raise Forbidden(f"may not publish to {topic}", op.id)
        if op.qos == 1:
            # Not acknowledged until durably stored; the durable store is not wired in yet.
            self.counters.received["unavailable"] += 1
            conn.error(ErrorCode.UNAVAILABLE, "qos 1 is not available on this router yet", op.id)
            return
        ts = now_ms()
        frame = codec.encode_msgpack(protocol.msg_frame(topic, op.data, 0, conn.sender, ts))
        item = (routing.PUB, topic, frame, 0, conn.sender, ts, op.retain, op.id)
        if self.shards.owner_channel(placement_key(topic)).push(item):
            self.counters.received["routed"] += 1
        else:
            self.counters.received["queue_full"] += 1
            self.counters.dropped["router_backlog"] += 1
            conn.tell_queue_full(op.id)

    async def _subscribe(self, conn: ClientConnection, op: protocol.Subscribe) -> None:
        granted = [f for f in op.topics if conn.identity.permissions.can_subscribe(f)]
        if not granted:
            raise Forbidden(f"may not subscribe to {', '.join(op.topics)[:200]}", op.id)
        try:
            await asyncio.wait_for(
                asyncio.gather(*(self._add_local(f, conn) for f in granted)), SUBSCRIBE_TIMEOUT_S
            )
        except (RouterUnavailable, asyncio.TimeoutError):
            for topic_filter in granted:
                self._drop_local(topic_filter, conn)
            conn.error(ErrorCode.UNAVAILABLE, "subscription could not be registered, retry", op.id)
            return
        conn.subscriptions.update(granted)
        self._session_subscriptions(conn)
        self.counters.received["sub"] += 1
        conn.send_frame(protocol.ack_frame("suback", op.id, granted))

    async def _unsubscribe(self, conn: ClientConnection, op: protocol.Unsubscribe) -> None:
        for topic_filter in op.topics:
            if topic_filter in conn.subscriptions:
                self._drop_local(topic_filter, conn)
        self._session_subscriptions(conn)
        self.counters.received["unsub"] += 1
        conn.send_frame(protocol.ack_frame("unsuback", op.id, op.topics))

    def _session_subscriptions(self, conn: ClientConnection) -> None:
        self.shards.owner_channel(session_ring_key(conn.session_id)).push(
            (routing.SESSION_SUBS, conn.session_id, tuple(sorted(conn.subscriptions)))
        )

    def _filter_channels(self, topic_filter: str) -> list[Channel]:
        if has_wildcard(topic_filter):
            return self.shards.channels()
        return [self.shards.owner_channel(placement_key(topic_filter))]

    async def _add_local(self, topic_filter: str, conn: ClientConnection) -> None:
        """Hold ``topic_filter`` for ``conn``; returns once the shards route it to this ingress."""
        self.local.add(topic_filter, conn)
        conn.subscriptions.add(topic_filter)
        registration = self._registrations.get(topic_filter)
        if registration is None or (
            registration.done()
            and (registration.cancelled() or registration.exception() is not None)
        ):
            registration = asyncio.ensure_future(
                asyncio.gather(
                    *(
                        channel.request((routing.SUB, next_request_id(), topic_filter))
                        for channel in self._filter_channels(topic_filter)
                    )
                )
            )
            self._registrations[topic_filter] = registration
        await asyncio.shield(registration)

    def _drop_local(self, topic_filter: str, conn: ClientConnection) -> None:
        conn.subscriptions.discard(topic_filter)
        if self.local.remove(topic_filter, conn):
            registration = self._registrations.pop(topic_filter, None)
            if registration is not None and not registration.done():
                registration.cancel()
            for channel in self._filter_channels(topic_filter):
                channel.push((routing.UNSUB, next_request_id(), topic_filter))

    # From the shards

    def deliver(self, items: list[tuple]) -> None:
        """Fan a batch of messages from a shard out to the local subscribers."""
        match = self.local.match
        delivered = dropped = 0
        touched: set[ClientConnection] = set()
        for item in items:
            subscribers = match(item[1])
            if not subscribers:
                continue
            frame: bytes = item[2]
            as_json: str | None = None
            for conn in subscribers:
                if conn.encoding is Encoding.MSGPACK:
                    conn.queue_message(frame)
                else:
                    if as_json is None:
                        as_json = codec.encode_json(codec.decode_frame(frame))
                    conn.queue_message(as_json)
                touched.add(conn)
                delivered += 1
        for conn in touched:
            dropped += conn.flush()
        self.counters.delivered += delivered - dropped
        if dropped:
            self.counters.dropped["subscriber_queue_full"] += dropped

    def stats(self) -> dict[str, Any]:
        return {
            "ingress": self.name,
            "port": self.config.port,
            "connections": len(self.connections),
            "drones": sum(1 for c in self.connections.values() if c.identity.is_drone),
            "filters": len(self.local),
            "received": dict(self.counters.received),
            "delivered": self.counters.delivered,
            "dropped": dict(self.counters.dropped),
            "draining": self.draining,
            "shard_calls": {ch.destination: ch.calls for ch in self.shards.channels()},
        }


def _select_subprotocol(ws: ServerConnection, offered: Any) -> Any:
    for choice in codec.SUBPROTOCOLS:
        if choice in offered:
            return choice
    return None


def _response(
    status: http.HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None
) -> Response:
    response_headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    )
    for name, value in (headers or {}).items():
        response_headers[name] = value
    return Response(status.value, status.phrase, response_headers, body)
