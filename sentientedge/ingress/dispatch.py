"""Frames from clients to routing items, and deliveries from shards to frames for clients.

Rules for this module:
- A client frame costs no call of its own: it becomes an item on the stream to its shard (the
  topic's owner on the ring; every shard for a wildcard filter), written at the end of the turn.
- Nothing a client sends closes its connection except what PROTOCOL.md names: a frame that is
  too large (1009, websockets' protocol), too many bad frames or far over the rate limit (1008).
  A bug costs the frame an ``internal`` error, never the connection.
- A delivered message is the publisher's bytes: MessagePack subscribers get them as they are;
  JSON subscribers cost one re-encoding per message, shared by all of them. The WebSocket frame
  around it is built once per message and encoding.
- One bad item in a batch from a shard costs itself, counted and logged at most once a
  ``LOG_EVERY_S``: the rest of the batch is delivered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from sentientedge import codec, protocol, routing
from sentientedge.codec import Encoding
from sentientedge.errors import Forbidden, ProtocolError, RouterUnavailable
from sentientedge.ingress.connection import ClientConnection, Phase, frame_for, server_frame
from sentientedge.ingress.links import next_request_id
from sentientedge.metrics import RESPONSE_SAMPLE_EVERY
from sentientedge.protocol import CloseCode, ErrorCode
from sentientedge.ratelimit import Verdict
from sentientedge.ring import HashRing
from sentientedge.streams import StreamLink
from sentientedge.topics import has_wildcard, placement_key
from sentientedge.virtual import ring_key, session_ring_key
from sentientedge.wire import Item

if TYPE_CHECKING:
    from sentientedge.ingress.server import IngressServer

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 10.0
LOG_EVERY_S = 10.0
MAX_CACHED_TOPICS = 4096  # per connection
_UNKNOWN: Any = object()


def now_ms() -> int:
    return int(time.time() * 1000)


def encode_retained(conn: ClientConnection, frame: bytes) -> bytes | str:
    # A retained copy is the topic's current state, not a delivery to acknowledge: it goes out
    # as QoS 0 (no seq) with retained: true, whatever QoS it was published with.
    decoded = codec.decode_frame(frame)
    decoded["qos"] = 0
    decoded["retained"] = True
    return codec.encode(decoded, conn.encoding)


def session_open_item(conn: ClientConnection) -> Item:
    return (
        routing.SESSION_OPEN,
        conn.session_id,
        conn.principal,
        conn.connection_id,
        conn.opened_at,
    )


def sub_item(conn: ClientConnection, topic_filter: str, flags: int) -> Item:
    return (
        routing.SUB,
        next_request_id(),
        topic_filter,
        conn.session_id,
        conn.principal,
        conn.connection_id,
        flags,
    )


class Dispatcher:
    def __init__(self, server: IngressServer) -> None:
        self.server = server
        self.counters = server.counters
        self._failures = 0
        self._last_logged = 0.0
        self._until_timed = RESPONSE_SAMPLE_EVERY

    # From clients

    def on_frame(self, conn: ClientConnection, raw: bytes | str) -> None:
        counters = self.counters
        try:
            op = protocol.parse_client_frame(codec.decode_frame(raw))
            op_type = type(op)
            if op_type is protocol.Ack:
                counters.acks += 1
                conn.session.ack(op.seq)  # type: ignore[union-attr]
                return
            verdict = conn.rate.check(len(raw))
            if verdict is not Verdict.PASS:
                counters.received["rate_limited"] += 1
                if verdict is Verdict.CLOSE:
                    self.server.close(conn, CloseCode.POLICY, "far over the rate limit")
                elif verdict is Verdict.DROP_AND_TELL:
                    conn.error(
                        ErrorCode.RATE_LIMITED,
                        "over the rate limit (messages or bytes a second), message dropped",
                        getattr(op, "id", None),
                    )
                return
            if op_type is protocol.Publish:
                self._publish(conn, op)  # type: ignore[arg-type]
            elif op_type is protocol.Subscribe:
                granted = [f for f in op.topics if conn.identity.permissions.can_subscribe(f)]  # type: ignore[union-attr]
                if not granted:
                    topics = ", ".join(op.topics)[:200]  # type: ignore[union-attr]
                    raise Forbidden(f"may not subscribe to {topics}", op.id)  # type: ignore[union-attr]
                limit = self.server.config.max_subscriptions
                if len(set(conn.subscriptions).union(granted)) > limit:
                    raise Forbidden(
                        f"subscription limit: at most {limit} filters a connection "
                        "(MAX_SUBSCRIPTIONS); unsubscribe first",
                        op.id,  # type: ignore[union-attr]
                    )
                self._wait_for(conn, self._subscribe(conn, op, granted))  # type: ignore[arg-type]
            elif op_type is protocol.Unsubscribe:
                self._unsubscribe(conn, op)  # type: ignore[arg-type]
            elif op_type is protocol.Ping:
                conn.send(protocol.pong_frame(op.id))  # type: ignore[union-attr]
        except ProtocolError as exc:
            counters.received[exc.code] += 1
            conn.send(protocol.error_for(exc))
            # Malformed frames count towards the 1008 close; refusals (forbidden) do not.
            if exc.code != ErrorCode.FORBIDDEN and conn.bad_frames.record():
                self.server.close(conn, CloseCode.POLICY, "too many bad frames")
        except Exception:  # a bug must cost one frame an error, never the connection
            log.exception("frame from %s failed", conn.principal)
            counters.received["internal"] += 1
            conn.error(ErrorCode.INTERNAL, "internal error, frame not processed")

    def _wait_for(self, conn: ClientConnection, work: Coroutine[Any, Any, None]) -> None:
        """Frames of ``conn`` after this one wait until ``work`` is done (their order holds)."""
        conn.busy = True

        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("frame from %s failed", conn.principal)
                self.counters.received["internal"] += 1
                conn.error(ErrorCode.INTERNAL, "internal error, frame not processed")
            finally:
                conn.done_waiting()

        self.server.background(run())

    def _publish(self, conn: ClientConnection, op: protocol.Publish) -> None:
        topic = op.topic
        links = conn.publish_links
        if links is None:
            links = conn.publish_links = {}
        link = links.get(topic, _UNKNOWN)
        if link is _UNKNOWN:
            if len(links) >= MAX_CACHED_TOPICS:
                links.clear()
            allowed = conn.identity.permissions.can_publish(topic)
            link = links[topic] = (
                self.server.shards.owner(placement_key(topic)) if allowed else None
            )
        if link is None:
            raise Forbidden(f"may not publish to {topic}", op.id)
        ts = now_ms()
        frame = codec.encode_msgpack(protocol.msg_frame(topic, op.data, op.qos, conn.sender, ts))
        if op.qos == 1:
            self._publish_durable(conn, op, frame, link)
            return
        if link.push((routing.PUB, topic, frame, op.retain, conn.principal, ts)):
            self.counters.received["routed"] += 1
        else:
            self.counters.received["queue_full"] += 1
            self.counters.dropped["router_backlog"] += 1
            self.server.tell_queue_full(conn, op.id)

    def _publish_durable(
        self, conn: ClientConnection, op: protocol.Publish, frame: bytes, link: StreamLink
    ) -> None:
        """QoS 1: ``puback`` only once the owning shard has stored the message."""
        if conn.qos1_in_flight >= self.server.config.max_unacked:
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
        link.request_then(request, lambda reply: self._answer_publish(conn, op.id, reply))

    def _answer_publish(self, conn: ClientConnection, msg_id: Any, reply: Any) -> None:
        conn.qos1_in_flight -= 1
        if conn.phase is not Phase.OPEN:
            return  # the client resends with the same id; the store recognises it
        if isinstance(reply, Exception):
            self.counters.received["unavailable"] += 1
            conn.error(ErrorCode.UNAVAILABLE, "router unavailable, nothing stored; retry", msg_id)
            return
        status, detail = reply
        if status in ("ok", "dup"):
            self.counters.received["stored" if status == "ok" else "duplicate"] += 1
            conn.send({"op": "puback", "id": msg_id, "offset": detail})
        elif status == "forbidden":  # a bound of the identity: retrying will not help
            self.counters.received["forbidden"] += 1
            conn.error(ErrorCode.FORBIDDEN, detail, msg_id)
        else:
            self.counters.received["unavailable"] += 1
            conn.error(
                ErrorCode.UNAVAILABLE, "durable store unavailable, nothing stored; retry", msg_id
            )

    async def _subscribe(
        self, conn: ClientConnection, op: protocol.Subscribe, granted: list[str]
    ) -> None:
        new = [f for f in granted if f not in conn.subscriptions]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(self.register(f, conn, retained=True) for f in new)),
                SUBSCRIBE_TIMEOUT_S,
            )
        except (RouterUnavailable, asyncio.TimeoutError):
            for topic_filter in new:  # only what this sub added; older subscriptions stay
                self.release_route(topic_filter, conn, session_too=True)
            conn.error(ErrorCode.UNAVAILABLE, "subscription could not be registered, retry", op.id)
            return
        if conn.phase is not Phase.OPEN:
            return
        conn.add_subscriptions(new)
        self.server.keeper.save_subscriptions(conn)
        self.counters.received["sub"] += 1
        conn.send(protocol.ack_frame("suback", op.id, granted))
        if _own_command_topic(conn) in new:
            await conn.session.bind_commands()

    def _unsubscribe(self, conn: ClientConnection, op: protocol.Unsubscribe) -> None:
        for topic_filter in op.topics:
            if conn.drop_subscription(topic_filter):
                self.release_route(topic_filter, conn, session_too=True)
        self.server.keeper.save_subscriptions(conn)
        self.counters.received["unsub"] += 1
        conn.send(protocol.ack_frame("unsuback", op.id, op.topics))

    # Routes

    def filter_links(self, topic_filter: str) -> list[StreamLink]:
        """The shards that must know a route for ``topic_filter`` (during a reshard, on both
        rings), the owner on the ring in force first."""
        shards = self.server.shards
        if has_wildcard(topic_filter):
            return shards.all()
        return shards.owners(placement_key(topic_filter))

    async def register(self, topic_filter: str, conn: ClientConnection, *, retained: bool) -> None:
        """Route ``topic_filter`` to ``conn``: QoS 0 through this ingress, QoS 1 to its session.

        Returns once every shard that can hold a matching topic has the route. New subscribers
        get the retained messages (and drones' last telemetry) of matching topics first.
        """
        self.server.local.add(topic_filter, conn)
        flags = routing.SUB_SEND_RETAINED if retained else 0
        # Retained messages of an exact topic come from one shard: the owner on the ring in
        # force (listed first); a wildcard's from every shard.
        every = has_wildcard(topic_filter)
        links = self.filter_links(topic_filter)
        await asyncio.gather(
            *(
                link.request(sub_item(conn, topic_filter, flags if every or i == 0 else 0))
                for i, link in enumerate(links)
            )
        )

    def release_route(
        self, topic_filter: str, conn: ClientConnection, *, session_too: bool = False
    ) -> None:
        """``conn`` no longer receives ``topic_filter`` here; with ``session_too`` its session
        stops receiving it at all (an unsubscribe, not a disconnect)."""
        last_here = self.server.local.remove(topic_filter, conn)
        if not (last_here or session_too):
            return
        sid = conn.session_id if session_too else None
        for link in self.filter_links(topic_filter):
            link.push(
                (routing.UNSUB, next_request_id(), topic_filter, sid, last_here), control=True
            )

    def resync(self, shard: str) -> None:
        """``shard``'s process was replaced: register again what this ingress holds there."""
        server = self.server
        log.warning("%s: %s restarted, registering again", server.name, shard)
        self.counters.received["shard_resyncs"] += 1
        self.register_all(shard, server.shards.ring)
        # Messages the dead process stored but never sent on: each session looks in Redis.
        for conn in list(server.sessions.values()):
            conn.session.probe_soon()

    def register_all(self, shard: str, ring: HashRing) -> None:
        """Tell ``shard`` everything this ingress holds that ``ring`` places there: its
        connections, sessions and routes (after a restart, or before a reshard)."""
        server = self.server
        link = server.shards.link(shard)
        for conn in server.connections.values():
            if ring.owner(ring_key(conn.principal)) == shard:
                link.push((routing.RESTORE, conn.principal, conn.connection_id), control=True)
            if ring.owner(session_ring_key(conn.session_id)) == shard:
                link.push(session_open_item(conn), control=True)
            for topic_filter in conn.subscriptions:
                if has_wildcard(topic_filter) or ring.owner(placement_key(topic_filter)) == shard:
                    link.push(sub_item(conn, topic_filter, 0), control=True)

    # From the shards

    def deliver(self, items: list[Item]) -> None:
        """Hand a batch from a shard to the local connections it concerns."""
        server = self.server
        match = server.local.match
        delivered = dropped = 0
        for item in items:
            try:
                kind = item[0]
                if kind == routing.PUB:
                    subscribers = match(item[1])
                    if not subscribers:
                        continue
                    frame: bytes = item[2]
                    self._until_timed -= 1
                    if self._until_timed <= 0:  # receive at the router to the write, now
                        self._until_timed = RESPONSE_SAMPLE_EVERY
                        self.counters.response_time.observe(max(0.0, time.time() - item[5] / 1000))
                    as_msgpack: bytes | None = None
                    as_json: bytes | None = None
                    for conn in subscribers:
                        if conn.encoding is Encoding.MSGPACK:
                            if as_msgpack is None:
                                as_msgpack = server_frame(frame, False)
                            ok = conn.queue_message(as_msgpack)
                        else:
                            if as_json is None:
                                text = codec.encode_json(codec.decode_frame(frame))
                                as_json = server_frame(text.encode(), True)
                            ok = conn.queue_message(as_json)
                        delivered += 1
                        if not ok:
                            dropped += 1
                elif kind == routing.SESSION_MSG:
                    owner = server.sessions.get(item[1])
                    if owner is not None:  # else: stored, delivered when the session is back
                        owner.session.offer(item[2], item[3])
                        delivered += 1
                elif kind == routing.RETAINED:
                    target = server.connections.get(item[1])
                    if target is not None:
                        target.write_frame(frame_for(encode_retained(target, item[2])))
                        delivered += 1
                elif kind == routing.CLOSE:
                    closing = server.connections.get(item[1])
                    if closing is not None:
                        server.close(closing, item[2], item[3])
            except Exception:  # one poisoned item costs itself, not the batch
                self._failed(item)
        self.counters.delivered += delivered - dropped
        if dropped:
            self.counters.dropped["subscriber_queue_full"] += dropped

    def _failed(self, item: Item) -> None:
        self._failures += 1
        self.counters.dropped["delivery_failed"] += 1
        now = time.monotonic()
        if now - self._last_logged >= LOG_EVERY_S:
            self._last_logged = now
            log.exception(
                "%s: delivering an item (%r) failed; %d so far",
                self.server.name,
                str(item[0])[:8],
                self._failures,
            )


def _own_command_topic(conn: ClientConnection) -> str | None:
    return f"drone/{conn.sender}/cmd" if conn.identity.is_drone else None


__all__ = ["Dispatcher", "encode_retained", "session_open_item", "sub_item"]
