"""The ingress server's life cycle (serve, drain, stop) and what it holds: connections, sessions,
the local subscriptions, one keepalive timer for all, the health watch.

Rules for this module:
- This is the one place that opens the listening socket: ``PORT`` on ``HOST``, shared by every
  ingress process of a node (SO_REUSEPORT: the kernel spreads connections over them).
- The jobs live in their own modules: the request and frames of one client in
  ``connection``, admission in ``handshake``, frames to items and back in ``dispatch``, the
  shards' streams in ``links``, plain HTTP in ``http``; this module wires them.
- Work a connection waits on (a handshake, a subscription) runs as a short task; nothing runs
  per connection while it is idle: its keepalive is a slot in one timer wheel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from http import HTTPStatus
from typing import Any

from websockets.http11 import Response

from sentientedge import codec, protocol, routing, tls
from sentientedge.audit import AuditLog, audit_path
from sentientedge.auth import Permissions
from sentientedge.config import Config
from sentientedge.database import AuditShipper, Database
from sentientedge.errors import RouterUnavailable, StoreUnavailable
from sentientedge.forwarded import client_address
from sentientedge.ingress.connection import (
    KEEPALIVE_REASON,
    NO_SUBSCRIPTIONS,
    ClientConnection,
    Phase,
)
from sentientedge.ingress.credentials import CredentialWatch
from sentientedge.ingress.dispatch import Dispatcher, session_open_item
from sentientedge.ingress.handshake import Admission, Handshake, Refused
from sentientedge.ingress.http import HttpEndpoints, HttpRequest
from sentientedge.ingress.links import ShardLinks, next_request_id
from sentientedge.keepalive import Action, TimerWheel, keepalive_step
from sentientedge.metrics import IngressCollector, IngressCounters, ProcessLabels, make_registry
from sentientedge.protocol import CloseCode, ErrorCode
from sentientedge.ratelimit import BadFrameGuard, RateGuard
from sentientedge.records import SessionRecord
from sentientedge.sessions import AttachedSession, SessionKeeper
from sentientedge.store import Store
from sentientedge.topics import TopicTrie
from sentientedge.virtual import session_ring_key

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 10.0  # to send a whole request head (and, over TLS, to finish the handshake)
DRAIN_LINKS_S = 5.0
ARCHIVE_PING_TIMEOUT_S = 3.0


class IngressServer:
    def __init__(
        self,
        config: Config,
        name: str,
        shards: ShardLinks,
        store: Store,
        cluster_status: Callable[[], Awaitable[dict[str, Any]]],
        failover_state: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        request_scaling: Callable[[int], Awaitable[dict[str, Any]]] | None = None,
        node: str = "127.0.0.1",
        all_metrics: Callable[[], Awaitable[bytes]] | None = None,
        metrics_targets: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None,
    ) -> None:
        self.verifier = config.verifier  # raises at start-up on missing or short secrets
        self.config = config
        self.trusted_proxies = config.trusted_networks
        self.name = name
        self.shards = shards
        self.store = store
        self.cluster_status = cluster_status
        self._failover_state = failover_state
        self._request_scaling = request_scaling
        self.clock = time.monotonic
        self.connections: dict[str, ClientConnection] = {}  # open, by connection id
        self.sessions: dict[str, ClientConnection] = {}  # by session id
        self.local = TopicTrie[ClientConnection]()
        self.dirty: list[ClientConnection] = []  # connections with frames to write this turn
        self._flush_scheduled = False
        self._sockets: set[ClientConnection] = set()
        self._admitting: set[ClientConnection] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self.counters = IngressCounters()
        self.registry = make_registry(
            IngressCollector(
                ProcessLabels(node, name),
                self.counters,
                lambda: len(self.connections),
                lambda: sum(link.stats()["backlog"] for link in self.shards.all()),
                lambda: self._health["redis"] != "unreachable",
            )
        )
        self.all_metrics = all_metrics  # every process's, merged (GET /metrics on the port)
        self.metrics_targets = metrics_targets  # Prometheus HTTP service discovery
        self.endpoints = HttpEndpoints(self)
        # The archive's readers (GET /history) and the audit trail's copy, with DATABASE_URL.
        self.database: Database | None = None
        self.audit_shipper: AuditShipper | None = None
        if config.database_url is not None:
            self.database = Database(config.database_url, config.db_pool_size, config.key_ring)
            self.audit_shipper = AuditShipper(self.database)
        self.audit = AuditLog(
            audit_path(config.audit_log, config.state_dir),
            name,
            sink=None if self.audit_shipper is None else self.audit_shipper.add,
        )
        self.handshakes = Handshake(self)
        self.credentials = CredentialWatch(self)
        self.dispatch = Dispatcher(self)
        self.keeper = SessionKeeper(
            store, name, config.session_ttl, lambda: self.sessions, self.background
        )
        shards.on_restart = self.dispatch.resync
        self._tick = max(0.05, min(1.0, config.ping_interval / 4, config.ping_timeout / 4))
        self._wheel: TimerWheel[ClientConnection] = TimerWheel(self._tick)
        self._ticker: asyncio.TimerHandle | None = None
        self._health: dict[str, Any] = {"redis": "unknown", "shards": {}}
        self._recovering: list[str] = []
        self._server: asyncio.AbstractServer | None = None
        self._certificates: tls.CertificateReloader | None = None  # with USE_HTTPS
        self._tasks: list[asyncio.Task[None]] = []
        self.draining = False

    # Life cycle

    async def start(self) -> None:
        if self._server is not None:
            return
        config = self.config
        loop = asyncio.get_running_loop()
        context = tls.server_context(config) if config.use_https else None
        self._server = await loop.create_server(
            lambda: ClientConnection(self),
            config.host,
            config.port,
            reuse_port=True,
            backlog=4096,
            ssl=context,
            ssl_handshake_timeout=HEAD_TIMEOUT_S if config.use_https else None,
        )
        if context is not None:  # a renewed certificate is served without a restart
            self._certificates = tls.CertificateReloader.for_config(context, config)
            self._certificates.start()
        self._tasks = [
            loop.create_task(self._watch_health()),
            loop.create_task(self.keeper.run()),
            loop.create_task(self.credentials.run()),
        ]
        if self.database is not None and self.audit_shipper is not None:
            self._tasks.append(loop.create_task(self._watch_archive(self.database)))
            self._tasks.append(loop.create_task(self.audit_shipper.run()))
        self._ticker = loop.call_later(self._tick, self._on_tick)
        log.info("%s listening on %s:%d", self.name, config.host, config.port)

    async def drain(self, timeout: float = 30.0) -> dict[str, Any]:
        """Stop accepting connections (new ones go to the other ingresses on this port), then
        close the open ones with 1012: clients resume their sessions elsewhere, nothing lost."""
        self.draining = True
        if self._server is not None:
            self._server.close()  # the listening socket only; connections stay open
        connections = list(self.connections.values())
        for conn in connections:
            self.close(conn, CloseCode.RESTART, "draining: reconnect")
        await self._until_closed(timeout)
        await self.shards.drain(DRAIN_LINKS_S)
        return {"ingress": self.name, "closed": len(connections), "left": len(self.connections)}

    # Resharding (the controller runs each step on every ingress before the next step)

    async def announce_ring(self, shards: list[str], timeout: float = 30.0) -> dict[str, Any]:
        """Connect to the next ring's shards and register there what this ingress holds;
        returns once they have handled it all."""
        links = self.shards
        missing = await links.announce(shards, timeout)
        if missing:
            raise RouterUnavailable(f"no stream to {', '.join(missing)}")
        assert links.next_ring is not None
        for shard in links.next_ring.nodes:
            self.dispatch.register_all(shard, links.next_ring)
        # A shard handles a stream's items in order: its echo means it has the rest.
        await asyncio.wait_for(
            asyncio.gather(
                *(
                    links.link(shard).request((routing.ECHO, next_request_id()))
                    for shard in links.next_ring.nodes
                )
            ),
            timeout,
        )
        return {"ingress": self.name, "shards": list(links.next_ring.nodes)}

    async def take_over_ring(self, fence_s: float = 5.0) -> dict[str, Any]:
        """The announced ring in force: publications go by it from now on."""
        fenced = await self.shards.take_over(fence_s)
        for conn in self.connections.values():
            conn.publish_links = None  # they cached owners on the old ring
        if not fenced:
            log.warning("%s: reshard fence not closed within %.1f s", self.name, fence_s)
        return {"ingress": self.name, "fenced": fenced}

    async def finish_ring(self) -> dict[str, Any]:
        return {"ingress": self.name, "closed": await self.shards.finish()}

    async def stop(self, code: int = CloseCode.GOING_AWAY) -> None:
        self.draining = True  # handshakes from now on get 503 + Retry-After
        if self._server is not None:
            self._server.close()
        for conn in list(self._sockets):
            if conn.phase is Phase.OPEN:
                self.close(conn, code, "server going away")
            elif conn.transport is not None:
                conn.transport.close()
        await self._until_closed(5.0)
        for conn in list(self._sockets):  # a client that never answered our close
            if conn.transport is not None:
                conn.transport.abort()
        for task in self._tasks:
            task.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
        if self._certificates is not None:
            await self._certificates.stop()
            self._certificates = None
        # The closed connections' disconnects and unsubscribes are queued: let them out.
        await self.shards.drain(DRAIN_LINKS_S)
        await self.shards.close()
        await self.store.close()
        self.audit.close()
        self._server = None

    async def _until_closed(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._sockets and loop.time() < deadline:
            await asyncio.sleep(0.02)

    def background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def in_use(self) -> int:
        return len(self.connections) + len(self._admitting)

    # Writing, once per turn

    def flush_soon(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        self._flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            try:
                conn.flush()
            except Exception:  # one broken connection must not cost the others their writes
                log.exception("writing to %s failed", conn.principal or "a client")

    # What connections tell the server

    def accepted(self, conn: ClientConnection) -> None:
        self._sockets.add(conn)
        self._wheel.schedule(conn, self.clock() + HEAD_TIMEOUT_S)

    def http_request(self, conn: ClientConnection, request: HttpRequest) -> None:
        async def answer() -> None:
            try:
                response = await self.endpoints.answer(request, self.client_address(conn, request))
            except Exception:
                log.exception("http %s %s failed", request.method, request.path[:100])
                response = self.endpoints.reject(_INTERNAL, "internal", "internal error")
            conn.answer_http(response)

        self.background(answer())

    def client_address(self, conn: ClientConnection, request: HttpRequest) -> str:
        """The client's address: the socket's peer, or behind a trusted load balancer the
        address it forwarded (``TRUSTED_PROXIES``)."""
        if not self.trusted_proxies:
            return conn.peer_address
        forwarded = request.headers.get_all("X-Forwarded-For")
        return client_address(conn.peer_address, forwarded, self.trusted_proxies)

    def handshake(self, conn: ClientConnection, request: HttpRequest, upgrade: Response) -> None:
        address = self.client_address(conn, request)
        try:
            self.handshakes.check_rate(address)
            self.handshakes.check_room(address)
        except Refused as refused:
            conn.answer_http(refused.answer)
            return
        self._admitting.add(conn)
        self.background(self._admit(conn, request, upgrade, address))

    async def _admit(
        self, conn: ClientConnection, request: HttpRequest, upgrade: Response, address: str
    ) -> None:
        try:
            admission = await self.handshakes.admit(request, address)
        except Refused as refused:
            self._admitting.discard(conn)
            conn.answer_http(refused.answer)
            return
        except Exception:
            self._admitting.discard(conn)
            log.exception("handshake failed")
            conn.answer_http(self.endpoints.reject(_INTERNAL, "internal", "internal error"))
            return
        conn.admission = admission
        if admission.resumed is None and conn.phase is not Phase.GONE:
            self._name(conn, admission)
            await self.keeper.create(conn)  # before any QoS 1 can be stored for it
        self._admitting.discard(conn)
        if conn.phase is Phase.GONE:
            self.handshakes.release(admission.identity, admission.connection_id, "not opened")
            return
        conn.accept(upgrade)
        self.counters.handshakes[101] += 1
        self._open(conn, admission)

    def _name(self, conn: ClientConnection, admission: Admission) -> None:
        identity = admission.identity
        conn.identity = identity
        conn.sender = identity.subject
        conn.principal = identity.principal
        conn.connection_id = admission.connection_id
        conn.session_id = admission.session_id

    def _open(self, conn: ClientConnection, admission: Admission) -> None:
        config = self.config
        self._name(conn, admission)
        identity = admission.identity
        conn.opened_at = int(time.time() * 1000)
        conn.rate = (
            RateGuard.for_drone(config.drone_rate_hz, bytes_per_s=config.max_bytes_per_s)
            if identity.is_drone
            else RateGuard.for_person(config.rate_limit_max, bytes_per_s=config.max_bytes_per_s)
        )
        conn.bad_frames = BadFrameGuard()
        conn.session = AttachedSession(
            conn.session_id,
            conn.principal,
            self.store,
            config.max_unacked,
            conn.session_message,
            _no_flush,  # writes leave once per turn anyway
            admission.resumed,
        )
        self.connections[conn.connection_id] = conn
        previous = self.sessions.get(conn.session_id)
        self.sessions[conn.session_id] = conn
        if previous is not None:  # taken over on this very ingress
            self.close(previous, CloseCode.TAKEN_OVER, "session taken over")
        for link in self.shards.owners(session_ring_key(conn.session_id)):
            link.push(session_open_item(conn), control=True)
        rate_hz = config.drone_rate_hz if identity.is_drone else config.rate_limit_max / 60
        conn.phase = Phase.OPEN  # so the welcome is written; reading resumes in ``opened``
        conn.send(
            protocol.welcome_frame(
                conn.session_id,
                admission.resumed is not None,
                self.name,
                config.max_frame_bytes,
                rate_hz,
                config.message_queue_size,
            )
        )
        if self.draining:  # admitted just before the drain began: resume elsewhere
            self.close(conn, CloseCode.RESTART, "draining: reconnect")
            return
        conn.admission = None  # what it told is on the connection now
        if admission.resumed is not None:
            conn.busy = True  # frames wait until the session is back
            self.background(self._restore(conn, admission.resumed))
        self._wheel.schedule(conn, self.clock() + config.ping_interval)
        self.credentials.track(conn)
        conn.opened()

    async def _restore(self, conn: ClientConnection, record: SessionRecord) -> None:
        """A resumed session: its subscriptions come back, then its unacked messages."""
        try:
            dispatch = self.dispatch
            allowed = [
                f for f in record.subscriptions if conn.identity.permissions.can_subscribe(f)
            ]
            for topic_filter in set(record.subscriptions) - set(allowed):
                # The identity's rights were narrowed since: the session stops receiving it.
                for link in dispatch.filter_links(topic_filter):
                    link.push(
                        (routing.UNSUB, next_request_id(), topic_filter, conn.session_id, False),
                        control=True,
                    )
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(dispatch.register(f, conn, retained=False) for f in allowed)),
                    10.0,
                )
            except (RouterUnavailable, asyncio.TimeoutError):
                conn.error(ErrorCode.UNAVAILABLE, "subscriptions not all restored, subscribe again")
            if conn.phase is not Phase.OPEN:
                return
            conn.add_subscriptions(allowed)
            if set(allowed) != set(record.subscriptions):
                self.keeper.save_subscriptions(conn)
                # What was queued under the old rights is not for the new ones.
                conn.session.readable = partial(_may_read, conn.identity.permissions)
                conn.session.on_unreadable = partial(
                    self.counters.dropped.update, ("no_longer_readable",)
                )
            # Every shard now routes the session here. What was stored before this point may
            # have reached the old connection: it is redelivered flagged dup (read it now, not at
            # the handshake: messages stored in between went to the old place).
            await conn.session.resumed_here()
            if conn.identity.is_drone and f"drone/{conn.sender}/cmd" in conn.subscriptions:
                await conn.session.bind_commands()
        finally:
            conn.done_waiting()

    def frame(self, conn: ClientConnection, message: bytes | str) -> None:
        self.dispatch.on_frame(conn, message)

    def close(self, conn: ClientConnection, code: int, reason: str) -> None:
        self.counters.closes[code] += 1
        conn.close(code, reason)

    def tell_queue_full(self, conn: ClientConnection, frame_id: Any) -> None:
        """``queue_full`` to a publisher whose message was dropped, at most once a second."""
        now = self.clock()
        if now - conn.queue_full_told >= 1.0:
            conn.queue_full_told = now
            conn.error(ErrorCode.QUEUE_FULL, "router backlog full, message dropped", frame_id)

    def lost(self, conn: ClientConnection) -> None:
        """A socket is gone: whatever it held is released."""
        self._sockets.discard(conn)
        self._admitting.discard(conn)
        self._wheel.cancel(conn)
        if self.connections.get(conn.connection_id) is not conn:
            return  # never admitted, or admitted and not opened: ``_admit`` releases it
        reason = conn.close_reason
        del self.connections[conn.connection_id]
        if self.sessions.get(conn.session_id) is conn:
            del self.sessions[conn.session_id]
        conn.session.close()
        dispatch = self.dispatch
        away: dict[str, Any] = {}
        for topic_filter in list(conn.subscriptions):
            dispatch.release_route(topic_filter, conn)
            for link in dispatch.filter_links(topic_filter):
                away[link.peer] = link
        if conn.session_id not in self.sessions:  # not taken over by a connection here
            for link in away.values():
                link.push((routing.SESSION_AWAY, conn.session_id), control=True)
        # A session that never subscribed leaves nothing at its shard once its connection is
        # gone: a reconnect loop of publishers piles up no sessions there.
        subscribed = conn.subscriptions is not NO_SUBSCRIPTIONS
        for link in self.shards.owners(session_ring_key(conn.session_id)):
            link.push(
                (routing.SESSION_CLOSE, conn.session_id, conn.connection_id, subscribed),
                control=True,
            )
        self.handshakes.release(conn.identity, conn.connection_id, reason)
        self.background(self.keeper.leave(conn))

    # One timer for every connection

    def _on_tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._ticker = loop.call_later(self._tick, self._on_tick)
        now = self.clock()
        config = self.config
        for conn in self._wheel.due(now):
            try:
                phase = conn.phase
                if phase is Phase.OPEN:
                    action, next_at = keepalive_step(
                        now,
                        conn.last_heard,
                        conn.ping_sent,
                        config.ping_interval,
                        config.ping_timeout,
                    )
                    if action is Action.PING:
                        conn.ping(now)
                    elif action is Action.CLOSE:
                        # Nothing heard: the client is gone or stuck; no closing handshake.
                        conn.fail(CloseCode.INTERNAL, KEEPALIVE_REASON)
                        continue
                    self._wheel.schedule(conn, next_at)
                elif phase is Phase.HEAD:
                    conn.answer_http(
                        self.endpoints.reject(_TIMEOUT, "timeout", "request head not sent in time")
                    )
                elif phase is Phase.ADMITTING:
                    self._wheel.schedule(conn, now + HEAD_TIMEOUT_S)  # its own timeouts apply
            except Exception:
                log.exception("keepalive of a connection failed")

    # Health

    def health(self) -> dict[str, Any]:
        shards = self._health["shards"]
        healthy = (
            self._health["redis"] == "ok"
            and bool(shards)
            and all(state == "ok" for state in shards.values())
            and not self._recovering
        )
        # "degraded": routing works, the archive does not (rows wait in the shards): a load
        # balancer must keep the node; "unavailable" (503): take it out.
        archive = self._health.get("archive", "off")
        status = "unavailable" if not healthy else "ok" if archive in ("ok", "off") else "degraded"
        return {
            "status": status,
            "server": self.name,
            "connections": len(self.connections),
            "draining": self.draining,
            "redis": self._health["redis"],
            "shards": dict(shards),
            "archive": archive,
            "recovering": list(self._recovering),
        }

    async def _watch_health(self) -> None:
        echoes: dict[str, asyncio.Future[Any]] = {}
        rounds = 0
        while True:
            try:
                redis_ok = await self.store.ping()
                self._health["redis"] = "ok" if redis_ok else "unreachable"
                counters = self.counters
                counters.rates.sample(
                    time.monotonic(), sum(counters.received.values()), counters.delivered
                )
                if redis_ok and rounds % 10 == 0:
                    # Redis answering a ping may still fail a read (a slot moving): next time.
                    with contextlib.suppress(StoreUnavailable):
                        await self.store.refresh_revocations()
                links = self.shards.all()
                for gone in set(self._health["shards"]) - {link.peer for link in links}:
                    del self._health["shards"][gone]  # left the ring in a reshard
                for link in links:
                    shard = link.peer
                    echo = echoes.get(shard)
                    if echo is None or echo.done():  # never stack echoes behind a stuck shard
                        echo = echoes[shard] = link.request((routing.ECHO, next_request_id()))
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

    async def _watch_archive(self, database: Database) -> None:
        """Whether the archive's database answers (``/health``'s ``archive``)."""
        while True:
            try:
                ok = await asyncio.wait_for(database.ping(), ARCHIVE_PING_TIMEOUT_S)
            except asyncio.TimeoutError:
                ok = False
            self._health["archive"] = "ok" if ok else "unreachable"
            await asyncio.sleep(1.0 if ok else 0.5)

    async def _note_failovers(self, state: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        """What the controller knows of failovers: parts recovering now, events so far."""
        try:
            summary = await asyncio.wait_for(state(), 2.0)
        except Exception:  # the controller itself may be restarting: keep what we knew
            return
        self._recovering = list(summary.get("recovering", []))

    async def request_scaling(self, change: int) -> dict[str, Any]:
        """Ask the controller for ``change`` instances more (or fewer, negative)."""
        if self._request_scaling is None:
            raise RouterUnavailable("no controller to scale this router")
        return await self._request_scaling(change)

    def deliver(self, items: list[Any]) -> None:
        self.dispatch.deliver(items)

    def stats(self) -> dict[str, Any]:
        return {
            "ingress": self.name,
            "port": self.config.port,
            "connections": len(self.connections),
            "sockets": len(self._sockets),
            "drones": sum(1 for c in self.connections.values() if c.identity.is_drone),
            "filters": len(self.local),
            "received": dict(self.counters.received),
            "delivered": self.counters.delivered,
            "dropped": dict(self.counters.dropped),
            "draining": self.draining,
            "links": self.shards.stats(),
        }


_INTERNAL = HTTPStatus.INTERNAL_SERVER_ERROR
_TIMEOUT = HTTPStatus.REQUEST_TIMEOUT


def _may_read(permissions: Permissions, frame: bytes) -> bool:
    try:
        topic = codec.decode_frame(frame).get("topic")
        return isinstance(topic, str) and permissions.can_subscribe(topic)
    except Exception:  # a frame that does not decode is not sent either
        return False


def _no_flush() -> None:
    return None
