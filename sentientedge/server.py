"""The ingress: an asyncio ``websockets`` server that terminates client connections.

This is the one module of ``sentientedge`` that opens sockets. It knows nothing of Ray: the
topic shards are reached through :class:`ShardLinks`, whose transport the ingress actor injects.

Rules for this module:
- Credentials and limits are checked in the handshake hook (``process_request``), so a bad token
  or a full server is an HTTP answer (401, 429, 503) and no WebSocket is opened.
- A frame costs no call of its own: publications go into the stream to their shard
  (:mod:`sentientedge.ingress.links`), which writes once per turn of the event loop.
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
import ssl
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
from sentientedge.codec import Encoding
from sentientedge.config import Config
from sentientedge.errors import (
    AuthError,
    Forbidden,
    ProtocolError,
    RouterUnavailable,
    StoreUnavailable,
)
from sentientedge.ingress.links import ShardLinks, next_request_id
from sentientedge.metrics import IngressCollector, IngressCounters, make_registry, render
from sentientedge.protocol import CloseCode, ErrorCode
from sentientedge.ratelimit import BadFrameGuard, RateGuard, Verdict
from sentientedge.records import SessionRecord
from sentientedge.sessions import AttachedSession
from sentientedge.store import Store
from sentientedge.streams import StreamLink
from sentientedge.topics import TopicTrie, has_wildcard, placement_key
from sentientedge.virtual import ring_key, session_ring_key

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 5.0
SUBSCRIBE_TIMEOUT_S = 10.0
RETRY_AFTER_S = 5
PROBE_INTERVAL_S = 5.0
STORE_RETRY_S = 0.5


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Admission:
    """What the handshake established, handed to the connection handler."""

    identity: Identity
    connection_id: str
    session_id: str
    resumed: SessionRecord | None = None


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
        self.principal = admission.identity.principal
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
        self.qos1_in_flight = 0
        self.opened_at = now_ms()
        self.session = AttachedSession(
            self.session_id,
            self.principal,
            ingress.store,
            config.max_unacked,
            self._send_session_message,
            self.flush,
            admission.resumed,
        )

    def _send_session_message(self, seq: int, frame: bytes, dup: bool) -> None:
        fields: dict[str, Any] = {"seq": seq, "dup": True} if dup else {"seq": seq}
        self.queue_message(self.encode_stored(frame, fields))

    def session_open_item(self) -> tuple:
        return (
            routing.SESSION_OPEN,
            self.session_id,
            self.principal,
            self.connection_id,
            self.opened_at,
        )

    def sub_item(self, topic_filter: str, flags: int) -> tuple:
        return (
            routing.SUB,
            next_request_id(),
            topic_filter,
            self.session_id,
            self.principal,
            self.connection_id,
            flags,
        )

    @property
    def own_command_topic(self) -> str | None:
        return f"drone/{self.sender}/cmd" if self.identity.is_drone else None

    def encode_retained(self, frame: bytes) -> bytes | str:
        # A retained copy is the topic's current state, not a delivery to acknowledge: it goes
        # out as QoS 0 (no seq) with retained: true, whatever QoS it was published with.
        decoded = codec.decode_frame(frame)
        decoded["qos"] = 0
        decoded["retained"] = True
        return codec.encode(decoded, self.encoding)

    def encode_stored(self, frame: bytes, fields: dict[str, Any]) -> bytes | str:
        """A stored ``msg`` frame (MessagePack) with ``fields`` added, in this client's encoding."""
        if self.encoding is Encoding.MSGPACK:
            return codec.with_fields(frame, fields)
        return codec.encode_json({**codec.decode_frame(frame), **fields})

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
        failover_state: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        config.require_secrets()
        self.config = config
        self.name = name
        self.shards = shards
        self.store = store
        self._cluster_status = cluster_status
        self._failover_state = failover_state
        self._recovering: list[str] = []
        self._server: Server | None = None
        self._admissions: dict[ServerConnection, Admission] = {}
        self.connections: dict[str, ClientConnection] = {}
        self.sessions: dict[str, ClientConnection] = {}
        self.local = TopicTrie[ClientConnection]()
        shards.on_restart = self._resync
        self._background: set[asyncio.Task[Any]] = set()
        self._connection_ids = itertools.count(1)
        self._epoch = uuid.uuid4().hex[:8]
        self.counters = IngressCounters()
        self._registry = make_registry(
            IngressCollector(name, self.counters, lambda: len(self.connections))
        )
        self._health: dict[str, Any] = {"redis": "unknown", "shards": {}}
        self._monitor: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._handshaking = 0
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
            ssl=_tls_context(config) if config.use_https else None,
            server_header=None,
        )
        loop = asyncio.get_running_loop()
        self._monitor = loop.create_task(self._watch_health())
        self._keeper = loop.create_task(self._keep_sessions())
        log.info("%s listening on %s:%d", self.name, config.host, config.port)

    async def stop(self, code: int = CloseCode.GOING_AWAY) -> None:
        self.draining = True  # handshakes from now on get 503 + Retry-After
        for task in (self._monitor, self._keeper):
            if task is not None:
                task.cancel()
        if self._server is not None:
            self._server.close(close_connections=True, code=code)
            await self._server.wait_closed()
            self._server = None
        # The closed connections' disconnects and unsubscribes are queued: let them out.
        await self.shards.drain(timeout=5.0)
        await self.shards.close()
        await self.store.close()

    async def drain(self, timeout: float = 30.0) -> dict[str, Any]:
        """Stop accepting connections (new ones go to the other ingresses on this port), then
        close the open ones with 1012: clients resume their sessions elsewhere, nothing lost."""
        self.draining = True
        if self._server is not None:
            self._server.server.close()  # the listening socket only; connections stay open
        connections = list(self.connections.values())
        for conn in connections:
            self._close_soon(conn, CloseCode.RESTART, "draining: reconnect")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.shards.drain(timeout=5.0)
        return {"ingress": self.name, "closed": len(connections), "left": len(self.connections)}

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
        in_use = len(self.connections) + len(self._admissions) + self._handshaking
        if self.draining or in_use >= self.config.max_ws_connections:
            return self._reject(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "unavailable",
                "server draining" if self.draining else "server full",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        self._handshaking += 1
        try:
            return await self._admit(ws, request, query)
        finally:
            self._handshaking -= 1

    async def _admit(
        self, ws: ServerConnection, request: Request, query: dict[str, str]
    ) -> Response | None:
        try:
            identity = await self._authenticate(request.headers, query)
        except AuthError as exc:
            return self._reject(http.HTTPStatus.UNAUTHORIZED, "unauthorized", exc.reason)
        connection_id = f"{self.name}.{self._epoch}.{next(self._connection_ids)}"
        channel = self.shards.owner(ring_key(identity.principal))
        request_id = next_request_id()
        try:
            granted = await asyncio.wait_for(
                channel.request((routing.CONNECT, request_id, identity.principal, connection_id)),
                HANDSHAKE_TIMEOUT_S,
            )
        except (RouterUnavailable, asyncio.TimeoutError):
            # The CONNECT may still arrive and be counted: release it, in order after it.
            return self._not_admitted(channel, identity, connection_id, "router not ready")
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
        try:
            session_id, record = await self._session_for(identity, request.headers, query)
        except StoreUnavailable:
            # Resuming needs Redis; a fresh session instead would orphan the old one's messages.
            return self._not_admitted(
                channel, identity, connection_id, "session store unavailable, retry to resume"
            )
        self._admissions[ws] = Admission(identity, connection_id, session_id, record)
        # Whatever happens to the socket from here on, the connection is counted until it is lost.
        ws.connection_lost_waiter.add_done_callback(
            lambda _: self._release(identity.principal, connection_id, ws)
        )
        self.counters.handshakes[101] += 1
        return None

    def _not_admitted(
        self, channel: StreamLink, identity: Identity, connection_id: str, reason: str
    ) -> Response:
        """503 + Retry-After, and the connection's count released at its shard."""
        channel.push(
            (routing.DISCONNECT, identity.principal, connection_id, "not admitted"), control=True
        )
        return self._reject(
            http.HTTPStatus.SERVICE_UNAVAILABLE,
            "unavailable",
            reason,
            {"Retry-After": str(RETRY_AFTER_S)},
        )

    async def _session_for(
        self, identity: Identity, headers: Headers, query: dict[str, str]
    ) -> tuple[str, SessionRecord | None]:
        """The session to resume (same identity, not expired), else a fresh one."""
        try:
            wanted = query.get("session") or headers.get("X-Session")
        except LookupError:  # the header twice: ambiguous, so nothing to resume
            wanted = None
        if wanted:
            record = await self.store.claim_session(wanted, identity.principal, self.name)
            if record is not None:
                return wanted, record
        return uuid.uuid4().hex, None

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
        self.shards.owner(ring_key(principal)).push(
            (routing.DISCONNECT, principal, connection_id, _close_reason(ws)), control=True
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
            and not self._recovering
        )
        return {
            "status": "ok" if healthy else "degraded",
            "server": self.name,
            "connections": len(self.connections),
            "draining": self.draining,
            "redis": self._health["redis"],
            "shards": dict(shards),
            "recovering": list(self._recovering),
        }

    def _health_response(self) -> Response:
        report = self.health()
        status = (
            http.HTTPStatus.OK if report["status"] == "ok" else http.HTTPStatus.SERVICE_UNAVAILABLE
        )
        return _response(status, json.dumps(report).encode(), "application/json")

    async def _watch_health(self) -> None:
        echoes: dict[str, asyncio.Future[Any]] = {}
        rounds = 0
        while True:
            try:
                redis_ok = await self.store.ping()
                self._health["redis"] = "ok" if redis_ok else "unreachable"
                if redis_ok and rounds % 10 == 0:
                    await self.store.refresh_revocations()
                for channel in self.shards.all():
                    shard = channel.peer
                    echo = echoes.get(shard)
                    if echo is None or echo.done():  # never stack echoes behind a stuck shard
                        echo = echoes[shard] = channel.request((routing.ECHO, next_request_id()))
                    try:
                        await asyncio.wait_for(asyncio.shield(echo), 2.0)
                        self._health["shards"][shard] = "ok"
                    except (RouterUnavailable, asyncio.TimeoutError):
                        self._health["shards"][shard] = "unreachable"
                if self._failover_state is not None:
                    await self._note_failovers(self._failover_state)
            except Exception:  # the watch must outlive any one failure, or /health would lie
                log.exception("health check failed")
                self._health["redis"] = "unknown"
            rounds += 1
            await asyncio.sleep(1.0)

    async def _note_failovers(self, state: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        """What the controller knows of failovers: parts recovering now, events so far."""
        try:
            summary = await asyncio.wait_for(state(), 2.0)
        except Exception:  # the controller itself may be restarting: keep what we knew
            return
        self._recovering = list(summary.get("recovering", []))
        self.counters.failover_events = dict(summary.get("failover_events_total", {}))

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
        if self.draining:  # admitted just before the drain began: resume elsewhere
            self.counters.closes[CloseCode.RESTART] += 1
            await ws.close(CloseCode.RESTART, "draining: reconnect")
            return
        conn = ClientConnection(self, ws, admission, Encoding.from_subprotocol(ws.subprotocol))
        self.connections[conn.connection_id] = conn
        previous = self.sessions.get(conn.session_id)
        self.sessions[conn.session_id] = conn
        config = self.config
        session_channel = self.shards.owner(session_ring_key(conn.session_id))
        try:
            if previous is not None:  # taken over on this very ingress
                self._close_soon(previous, CloseCode.TAKEN_OVER, "session taken over")
            session_channel.push(conn.session_open_item(), control=True)
            if admission.resumed is None:
                await self._create_session(conn)
            rate_hz = config.drone_rate_hz if conn.identity.is_drone else config.rate_limit_max / 60
            conn.send_frame(
                protocol.welcome_frame(
                    conn.session_id,
                    admission.resumed is not None,
                    self.name,
                    config.max_frame_bytes,
                    rate_hz,
                    config.message_queue_size,
                )
            )
            if admission.resumed is not None:
                await self._restore(conn, admission.resumed)
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
            if self.sessions.get(conn.session_id) is conn:
                del self.sessions[conn.session_id]
            conn.session.close()
            away: dict[str, StreamLink] = {}
            for topic_filter in list(conn.subscriptions):
                self._release_route(topic_filter, conn)
                for channel in self._filter_channels(topic_filter):
                    away[channel.peer] = channel
            if conn.session_id not in self.sessions:  # not taken over by a connection here
                for channel in away.values():
                    channel.push((routing.SESSION_AWAY, conn.session_id), control=True)
            session_channel.push(
                (routing.SESSION_CLOSE, conn.session_id, conn.connection_id), control=True
            )
            if ws.close_code == CloseCode.TOO_LARGE:
                self.counters.closes[CloseCode.TOO_LARGE] += 1
            await self._leave_session(conn)

    async def _create_session(self, conn: ClientConnection) -> None:
        try:
            await self.store.create_session(conn.session_id, conn.principal, self.name)
        except StoreUnavailable as exc:
            # QoS 0 works without it (and no QoS 1 is stored while Redis is away); the record
            # is made as soon as Redis answers again.
            log.warning("session %s not stored yet: %s", conn.session_id, exc)
            self._until_stored(conn, "session record")

    def _until_stored(self, conn: ClientConnection, what: str) -> None:
        """Write the session's record (with its subscriptions) until Redis takes it."""

        async def retry() -> None:
            while conn.connection_id in self.connections:
                await asyncio.sleep(STORE_RETRY_S)
                try:
                    await self.store.touch_sessions(
                        {conn.session_id: (conn.principal, sorted(conn.subscriptions))}, self.name
                    )
                    return
                except StoreUnavailable:
                    continue
            log.info("session %s: %s given up, the connection is gone", conn.session_id, what)

        task = asyncio.get_running_loop().create_task(retry())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _restore(self, conn: ClientConnection, record: SessionRecord) -> None:
        """A resumed session: its subscriptions come back, then its unacked messages."""
        allowed = [f for f in record.subscriptions if conn.identity.permissions.can_subscribe(f)]
        for topic_filter in set(record.subscriptions) - set(allowed):
            # The identity's rights were narrowed since: the session stops receiving it.
            for channel in self._filter_channels(topic_filter):
                channel.push(
                    (routing.UNSUB, next_request_id(), topic_filter, conn.session_id, False),
                    control=True,
                )
        try:
            await asyncio.wait_for(
                asyncio.gather(*(self._register(f, conn, retained=False) for f in allowed)),
                SUBSCRIBE_TIMEOUT_S,
            )
        except (RouterUnavailable, asyncio.TimeoutError):
            conn.error(ErrorCode.UNAVAILABLE, "subscriptions not all restored, subscribe again")
        conn.subscriptions.update(allowed)
        if set(allowed) != set(record.subscriptions):
            self._save_subscriptions(conn)
        # Every shard now routes the session here. What was stored before this point may have
        # reached the old connection: it is redelivered flagged dup (read it now, not at the
        # handshake: messages stored in between went to the old place).
        await conn.session.resumed_here()
        if conn.own_command_topic in conn.subscriptions:
            await conn.session.bind_commands()

    async def _leave_session(self, conn: ClientConnection) -> None:
        try:
            await conn.session.flush_acks()
            # SESSION_TTL counts from now: the session waits that long to be resumed.
            await self.store.touch_sessions(
                {conn.session_id: (conn.principal, sorted(conn.subscriptions))}, self.name
            )
        except StoreUnavailable as exc:
            log.warning("session %s: not refreshed on close: %s", conn.session_id, exc)

    def _close_soon(self, conn: ClientConnection, code: int, reason: str) -> None:
        self.counters.closes[code] += 1
        task = asyncio.get_running_loop().create_task(conn.ws.close(code, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _on_frame(self, conn: ClientConnection, raw: bytes | str) -> tuple[int, str] | None:
        """Handle one client frame; returns (close code, reason) when the client must go."""
        counters = self.counters
        try:
            op = protocol.parse_client_frame(codec.decode_frame(raw))
            op_type = type(op)
            if op_type is protocol.Ack:
                conn.session.ack(op.seq)  # type: ignore[union-attr]
                return None
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
            if op_type is protocol.Publish:
                self._publish(conn, op)  # type: ignore[arg-type]
            elif op_type is protocol.Subscribe:
                await self._subscribe(conn, op)  # type: ignore[arg-type]
            elif op_type is protocol.Unsubscribe:
                self._unsubscribe(conn, op)  # type: ignore[arg-type]
            elif op_type is protocol.Ping:
                conn.send_frame(protocol.pong_frame(op.id))  # type: ignore[union-attr]
            return None
        except ProtocolError as exc:
            counters.received[exc.code] += 1
            conn.send_frame(protocol.error_for(exc))
            # Malformed frames count towards the 1008 close; refusals (forbidden) do not.
            if exc.code != ErrorCode.FORBIDDEN and conn.bad_frames.record():
                return CloseCode.POLICY, "too many bad frames"
            return None
        except websockets.ConnectionClosed:
            raise
        except Exception:  # a bug must cost one frame an error, never the connection
            log.exception("frame from %s failed", conn.principal)
            counters.received["internal"] += 1
            conn.error(ErrorCode.INTERNAL, "internal error, frame not processed")
            return None

    def _publish(self, conn: ClientConnection, op: protocol.Publish) -> None:
        topic = op.topic
        if not conn.may_publish(topic):
            raise Forbidden(f"may not publish to {topic}", op.id)
        ts = now_ms()
        frame = codec.encode_msgpack(protocol.msg_frame(topic, op.data, op.qos, conn.sender, ts))
        channel = self.shards.owner(placement_key(topic))
        if op.qos == 1:
            self._publish_durable(conn, op, frame, channel)
            return
        if channel.push((routing.PUB, topic, frame, op.retain, conn.principal, ts)):
            self.counters.received["routed"] += 1
        else:
            self.counters.received["queue_full"] += 1
            self.counters.dropped["router_backlog"] += 1
            conn.tell_queue_full(op.id)

    def _publish_durable(
        self, conn: ClientConnection, op: protocol.Publish, frame: bytes, channel: StreamLink
    ) -> None:
        """QoS 1: ``puback`` only once the owning shard has stored the message."""
        if conn.qos1_in_flight >= self.config.max_unacked:
            self.counters.received["queue_full"] += 1
            conn.error(ErrorCode.QUEUE_FULL, "too many qos 1 messages awaiting puback", op.id)
            return
        conn.qos1_in_flight += 1
        request = (
            routing.PUB1,
            next_request_id(),
            op.topic,
            frame,
            op.retain,
            conn.principal,
            op.id,
        )
        channel.request_then(request, lambda reply: self._answer_publish(conn, op.id, reply))

    def _answer_publish(self, conn: ClientConnection, msg_id: Any, reply: Any) -> None:
        conn.qos1_in_flight -= 1
        if conn.ws.protocol.state is not State.OPEN:
            return  # the client resends with the same id; the store recognises it
        if isinstance(reply, Exception):
            self.counters.received["unavailable"] += 1
            conn.error(ErrorCode.UNAVAILABLE, "router unavailable, nothing stored; retry", msg_id)
            return
        status, detail = reply
        if status in ("ok", "dup"):
            self.counters.received["stored" if status == "ok" else "duplicate"] += 1
            conn.send_frame({"op": "puback", "id": msg_id, "offset": detail})
        else:
            self.counters.received["unavailable"] += 1
            conn.error(
                ErrorCode.UNAVAILABLE, "durable store unavailable, nothing stored; retry", msg_id
            )

    async def _subscribe(self, conn: ClientConnection, op: protocol.Subscribe) -> None:
        granted = [f for f in op.topics if conn.identity.permissions.can_subscribe(f)]
        if not granted:
            raise Forbidden(f"may not subscribe to {', '.join(op.topics)[:200]}", op.id)
        new = [f for f in granted if f not in conn.subscriptions]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(self._register(f, conn, retained=True) for f in new)),
                SUBSCRIBE_TIMEOUT_S,
            )
        except (RouterUnavailable, asyncio.TimeoutError):
            for topic_filter in new:  # only what this sub added; older subscriptions stay
                self._release_route(topic_filter, conn, session_too=True)
            conn.error(ErrorCode.UNAVAILABLE, "subscription could not be registered, retry", op.id)
            return
        conn.subscriptions.update(new)
        self._save_subscriptions(conn)
        self.counters.received["sub"] += 1
        conn.send_frame(protocol.ack_frame("suback", op.id, granted))
        if conn.own_command_topic in new:
            await conn.session.bind_commands()

    def _unsubscribe(self, conn: ClientConnection, op: protocol.Unsubscribe) -> None:
        for topic_filter in op.topics:
            if topic_filter in conn.subscriptions:
                conn.subscriptions.discard(topic_filter)
                self._release_route(topic_filter, conn, session_too=True)
        self._save_subscriptions(conn)
        self.counters.received["unsub"] += 1
        conn.send_frame(protocol.ack_frame("unsuback", op.id, op.topics))

    def _save_subscriptions(self, conn: ClientConnection) -> None:
        async def save() -> None:
            try:
                await self.store.save_subscriptions(conn.session_id, sorted(conn.subscriptions))
            except StoreUnavailable as exc:
                log.warning("session %s: subscriptions not stored yet: %s", conn.session_id, exc)
                self._until_stored(conn, "subscriptions")

        task = asyncio.get_running_loop().create_task(save())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _filter_channels(self, topic_filter: str) -> list[StreamLink]:
        if has_wildcard(topic_filter):
            return self.shards.all()
        return [self.shards.owner(placement_key(topic_filter))]

    async def _register(self, topic_filter: str, conn: ClientConnection, *, retained: bool) -> None:
        """Route ``topic_filter`` to ``conn``: QoS 0 through this ingress, QoS 1 to its session.

        Returns once every shard that can hold a matching topic has the route. New subscribers
        get the retained messages (and drones' last telemetry) of matching topics first.
        """
        self.local.add(topic_filter, conn)
        item = conn.sub_item(topic_filter, routing.SUB_SEND_RETAINED if retained else 0)
        await asyncio.gather(
            *(channel.request(item) for channel in self._filter_channels(topic_filter))
        )

    def _release_route(
        self, topic_filter: str, conn: ClientConnection, *, session_too: bool = False
    ) -> None:
        """``conn`` no longer receives ``topic_filter`` here; with ``session_too`` its session
        stops receiving it at all (an unsubscribe, not a disconnect)."""
        last_here = self.local.remove(topic_filter, conn)
        if not (last_here or session_too):
            return
        sid = conn.session_id if session_too else None
        for channel in self._filter_channels(topic_filter):
            channel.push(
                (routing.UNSUB, next_request_id(), topic_filter, sid, last_here), control=True
            )

    def _resync(self, shard: str) -> None:
        """``shard``'s process was replaced: register again what this ingress holds there."""
        log.warning("%s: %s restarted, registering again", self.name, shard)
        self.counters.received["shard_resyncs"] += 1
        channel = self.shards.link(shard)
        ring = self.shards.ring
        for admission in self._admissions.values():  # admitted, not yet handled
            principal = admission.identity.principal
            if ring.owner(ring_key(principal)) == shard:
                channel.push((routing.RESTORE, principal, admission.connection_id), control=True)
        for conn in self.connections.values():
            if ring.owner(ring_key(conn.principal)) == shard:
                channel.push((routing.RESTORE, conn.principal, conn.connection_id), control=True)
            if ring.owner(session_ring_key(conn.session_id)) == shard:
                channel.push(conn.session_open_item(), control=True)
            for topic_filter in conn.subscriptions:
                if any(c is channel for c in self._filter_channels(topic_filter)):
                    channel.push(conn.sub_item(topic_filter, 0), control=True)
        # Messages the dead process stored but never sent on: each session looks in Redis.
        for conn in list(self.sessions.values()):
            conn.session.probe_soon()

    async def _keep_sessions(self) -> None:
        """Keep every held session alive in Redis (SESSION_TTL counts from the last touch), and
        look for QoS 1 messages stored for a session but never sent on to it.

        A stored message normally arrives at once from its shard; one whose shard died between
        storing and sending, or whose call was lost, is found here within ``PROBE_INTERVAL_S``.
        One pipelined read for all sessions.
        """
        touch_every = max(1.0, self.config.session_ttl / 3)
        last_touch = 0.0
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                held = dict(self.sessions)
                if time.monotonic() - last_touch >= touch_every:
                    await self.store.touch_sessions(
                        {
                            sid: (conn.principal, sorted(conn.subscriptions))
                            for sid, conn in held.items()
                        },
                        self.name,
                    )
                    last_touch = time.monotonic()
                behind: dict[str, int] = {}
                for sid, seq in (await self.store.session_seqs(list(held))).items():
                    conn = self.sessions.get(sid)
                    if conn is None:
                        continue
                    conn.session.learn_last(seq)
                    known = conn.session.delivery.known_last
                    if seq < known:  # Redis lost its last writes (a crash within the fsync
                        behind[sid] = known  # interval): seqs must never be handed out twice
                if behind:
                    await self.store.raise_seqs(behind)
            except StoreUnavailable as exc:
                log.warning("sessions not refreshed: %s", exc)
            except Exception:
                log.exception("session refresh failed")

    # From the shards

    def deliver(self, items: list[tuple]) -> None:
        """Hand a batch from a shard to the local connections it concerns."""
        match = self.local.match
        delivered = dropped = 0
        touched: set[ClientConnection] = set()
        for item in items:
            kind = item[0]
            if kind == routing.PUB:
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
            elif kind == routing.SESSION_MSG:
                owner = self.sessions.get(item[1])
                if owner is not None:  # else: stored, and delivered when the session is back
                    owner.session.offer(item[2], item[3])
                    touched.add(owner)
                    delivered += 1
            elif kind == routing.RETAINED:
                target = self.connections.get(item[1])
                if target is not None:
                    target.queue_message(target.encode_retained(item[2]))
                    touched.add(target)
                    delivered += 1
            elif kind == routing.CLOSE:
                closing = self.connections.get(item[1])
                if closing is not None:
                    self._close_soon(closing, item[2], item[3])
        for conn in touched:
            try:
                dropped += conn.flush()
            except Exception:  # one broken connection must not cost the others their batch
                log.exception("delivery to %s failed", conn.principal)
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
            "links": self.shards.stats(),
        }


def _tls_context(config: Config) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert config.tls_cert_file is not None and config.tls_key_file is not None
    context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    return context


def _close_reason(ws: ServerConnection) -> str:
    """Why a connection ended, in words for a drone's offline status."""
    sent, received = ws.protocol.close_sent, ws.protocol.close_rcvd
    if sent is not None and "keepalive" in sent.reason:
        return "ping timeout"
    if received is not None:
        return "closed"
    if sent is not None:
        return f"closed by the router ({sent.code})"
    return "connection lost"


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
