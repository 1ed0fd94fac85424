"""What a topic shard does with a batch from an ingress, as a pure object.

Rules for this module:
- Items between router processes are plain tuples whose first element names their kind
  (layouts below). They cross the streams (:mod:`sentientedge.wire`) by the thousand as
  MessagePack arrays; the layouts are the contract between ingress and shard. A request's
  second element is its request id; its answer goes back as ``(wire.REPLY, id, answer)``.
- QoS 0 routes on filters registered per ingress, not per connection: a shard sends each message
  once to every ingress with a matching subscriber, and the ingress fans out locally.
- QoS 1 routes on sessions: every session subscribed when the message is published gets it,
  online or not. The shard plans the publication (who gets it), the store makes it durable,
  and only then does the shard send it on (``PublicationPlan``, ``deliveries_for``).
- Wildcard filters are registered on every shard (a wildcard can match a topic on any shard);
  exact filters only on the shard that owns the topic.
- Nothing here does I/O; time comes in as arguments.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sentientedge import codec, protocol
from sentientedge.records import Publication, Recipient, Stored
from sentientedge.topics import TopicTrie, has_wildcard, matches, placement_key
from sentientedge.virtual import (
    DRONE_PREFIX,
    Drone,
    VirtualActors,
    ring_key,
    session_ring_key,
)

# Ingress -> shard.
# Messages carry the ``msg`` frame subscribers will get, MessagePack-encoded once by the
# publishing ingress: it crosses both streams as bytes, MessagePack subscribers receive it as it
# is, and only JSON subscribers cost a re-encoding.
PUB = "p"  # (PUB, topic, msg_frame, retain, principal, ts_ms): QoS 0; also shard -> ingress
PUB1 = "q"  # (PUB1, request_id, topic, msg_frame, retain, principal, msg_id) -> PubAck
SUB = "s"  # (SUB, request_id, filter, session_id, principal, connection_id, flags) -> True
UNSUB = "u"  # (UNSUB, request_id, filter, session_id, last_on_ingress) -> True
CONNECT = "c"  # (CONNECT, request_id, principal, connection_id) -> granted
RESTORE = "rc"  # (RESTORE, principal, connection_id): a connection this shard's restart forgot
DISCONNECT = "d"  # (DISCONNECT, principal, connection_id, reason)
SESSION_OPEN = "so"  # (SESSION_OPEN, session_id, principal, connection_id, opened_at_ms)
SESSION_CLOSE = "sc"  # (SESSION_CLOSE, session_id, connection_id, subscribed)
SESSION_AWAY = "sa"  # (SESSION_AWAY, session_id): its connection closed; routes stay for TTL
ECHO = "e"  # (ECHO, request_id) -> True: the shard is up and working through its backlog

# Shard -> ingress.
SESSION_MSG = "m"  # (SESSION_MSG, session_id, seq, msg_frame): a stored QoS 1 message
RETAINED = "r"  # (RETAINED, connection_id, msg_frame): for one new subscriber
CLOSE = "x"  # (CLOSE, connection_id, close_code, reason)

# SUB flags
SUB_SEND_RETAINED = 1  # a new subscription, not one restored on resume

ROUTER_SENDER = "$router"

log = logging.getLogger(__name__)

Reply = tuple[str, int, Any]  # (ingress that asked, request id, answer)


@dataclass(frozen=True)
class ConnectionLimits:
    per_drone: int
    per_user: int
    retained_per_drone: int = 100  # MAX_RETAINED_PER_DRONE

    def for_principal(self, principal: str) -> int:
        return self.per_drone if principal.startswith(DRONE_PREFIX) else self.per_user


@dataclass
class ShardCounters:
    routed: int = 0
    delivered: int = 0
    unrouted: int = 0
    batches: int = 0
    stored: int = 0
    duplicates: int = 0
    retained_refused: int = 0  # past MAX_RETAINED_PER_DRONE
    away_sessions_dropped: int = 0  # an identity's oldest away sessions past its bound
    bad_items: int = 0


@dataclass(slots=True)
class PublicationPlan:
    """A QoS 1 message to store: ``publication`` for the store, and who asked for it."""

    request_id: int | None  # None: published by the router itself (presence)
    ingress: str | None
    publication: Publication
    recipients: tuple[tuple[str, str], ...]  # (session id, ingress holding it) per recipient


@dataclass
class BatchResult:
    replies: list[Reply] = field(default_factory=list)
    deliveries: dict[str, list[tuple]] = field(default_factory=lambda: defaultdict(list))
    durable: list[PublicationPlan] = field(default_factory=list)
    retained_changes: dict[str, bytes | None] = field(default_factory=dict)


@dataclass
class SessionRoute:
    ingress: str
    principal: str
    away_since: int | None = None  # ms; set while no connection holds the session


def command_target(topic: str) -> str | None:
    """The drone a command topic (``drone/{id}/cmd``) is for, else None."""
    if topic.startswith("drone/") and topic.endswith("/cmd"):
        middle = topic[6:-4]
        if middle and "/" not in middle:
            return middle
    return None


class RetainedMessages(dict[str, bytes]):
    """Retained frames by topic, with how many topics each drone holds: one drone's key must
    not fill the shard (and Redis) with retained topics (``MAX_RETAINED_PER_DRONE``)."""

    def __init__(self) -> None:
        super().__init__()
        self.per_drone: Counter[str] = Counter()

    def __setitem__(self, topic: str, frame: bytes) -> None:
        if topic not in self and topic.startswith("drone/"):
            self.per_drone[placement_key(topic)] += 1
        super().__setitem__(topic, frame)

    def __delitem__(self, topic: str) -> None:
        super().__delitem__(topic)
        self._uncount(topic)

    def pop(self, topic: str, *default: Any) -> Any:
        if topic in self:
            self._uncount(topic)
        return super().pop(topic, *default)

    def setdefault(self, topic: str, frame: bytes) -> bytes:
        if topic not in self:
            self[topic] = frame
        return self[topic]

    def _uncount(self, topic: str) -> None:
        if topic.startswith("drone/"):
            key = placement_key(topic)
            self.per_drone[key] -= 1
            if self.per_drone[key] <= 0:
                del self.per_drone[key]

    def room_for(self, topic: str, limit: int) -> bool:
        return (
            topic in self
            or not topic.startswith("drone/")
            or self.per_drone[placement_key(topic)] < limit
        )


class ShardCore:
    """Routes, sessions' subscriptions, retained messages and the virtual actors of one shard."""

    def __init__(self, name: str, limits: ConnectionLimits) -> None:
        self.name = name
        self.limits = limits
        self.routes: TopicTrie[str] = TopicTrie()  # QoS 0: filter -> ingresses
        self.session_routes: TopicTrie[str] = TopicTrie()  # QoS 1: filter -> sessions
        self.session_filters: dict[str, set[str]] = defaultdict(set)  # session -> its filters
        self.sessions_at: dict[str, SessionRoute] = {}
        self.away_sessions: dict[str, dict[str, None]] = {}  # principal -> its away, oldest first
        self.retained = RetainedMessages()
        self.actors = VirtualActors()
        self.counters = ShardCounters()
        self.dirty_telemetry: set[str] = set()
        # QoS 0 messages on their way to the archive (topic, frame, publisher, ts), if any.
        self.on_routed: Callable[[str, bytes, str, int], None] | None = None

    def handle(self, ingress: str, items: Iterable[tuple], now_ms: int) -> BatchResult:
        result = BatchResult()
        deliveries = result.deliveries
        match = self.routes.match
        principals = self.actors.principals
        counters = self.counters
        on_routed = self.on_routed
        counters.batches += 1
        for item in items:
            try:
                kind = item[0]
                if kind == PUB:
                    topic = item[1]
                    destinations = match(topic)
                    if destinations:
                        for destination in destinations:
                            deliveries[destination].append(item)
                        counters.delivered += len(destinations)
                    else:
                        counters.unrouted += 1
                    counters.routed += 1
                    if on_routed is not None:
                        on_routed(topic, item[2], item[4], item[5])
                    if item[3]:
                        self._retain(result, topic, item[2])
                    if topic.startswith("drone/"):
                        drone = principals.get(item[4])
                        if drone is not None and topic.startswith(f"drone/{drone.principal[6:]}/"):
                            drone.observe(topic, item[2], item[5])  # type: ignore[attr-defined]
                            if topic.endswith("/telemetry"):
                                self.dirty_telemetry.add(drone.principal)
                elif kind == PUB1:
                    _, request_id, topic, frame, retain, principal, msg_id = item
                    if retain and not self.retained.room_for(topic, self.limits.retained_per_drone):
                        counters.retained_refused += 1
                        refusal = (
                            "forbidden",
                            f"retained topic limit: at most {self.limits.retained_per_drone} "
                            "retained topics a drone (MAX_RETAINED_PER_DRONE); nothing stored",
                        )
                        result.replies.append((ingress, request_id, refusal))
                        continue
                    result.durable.append(
                        self.plan(request_id, ingress, topic, frame, retain, principal, msg_id)
                    )
                elif kind == SUB:
                    self._subscribe(ingress, item, result)
                    result.replies.append((ingress, item[1], True))
                elif kind == UNSUB:
                    _, request_id, topic_filter, sid, last_on_ingress = item
                    if sid is not None:
                        self._unroute_session(sid, topic_filter)
                    if last_on_ingress:
                        self.routes.remove(topic_filter, ingress)
                    result.replies.append((ingress, request_id, True))
                elif kind == CONNECT:
                    principal = item[2]
                    actor = self.actors.principal(principal)
                    was_online = actor.online
                    granted = actor.connect(item[3], ingress, self.limits.for_principal(principal))
                    result.replies.append((ingress, item[1], granted))
                    if granted and not was_online and isinstance(actor, Drone):
                        result.durable.append(self.presence(actor.drone_id, True, None, now_ms))
                elif kind == RESTORE:
                    # Counted without the limit and without presence: it was admitted long ago.
                    self.actors.principal(item[1]).connections[item[2]] = ingress
                elif kind == DISCONNECT:
                    self._disconnect(item[1], item[2], item[3], result, now_ms)
                elif kind == SESSION_OPEN:
                    self._open_session(ingress, item, result)
                elif kind == SESSION_AWAY:
                    route = self.sessions_at.get(item[1])
                    # Only the ingress that holds the session may say it left: a resume elsewhere
                    # may already have moved it.
                    if route is not None and route.ingress == ingress:
                        self._mark_away(item[1], route, now_ms)
                elif kind == SESSION_CLOSE:
                    closing = self.actors.sessions.get(item[1])
                    if closing is not None and closing.connection_id == item[2]:
                        if len(item) > 3 and not item[3]:  # never subscribed: nothing to keep
                            del self.actors.sessions[item[1]]
                        else:
                            closing.detach(now_ms)
                elif kind == ECHO:
                    result.replies.append((ingress, item[1], True))

            except Exception:  # a malformed item (a peer's bug) costs itself, not the batch
                log.exception("%s: bad item %r from %s", self.name, item[:2], ingress)
                counters.bad_items += 1
        return result

    def _open_session(self, ingress: str, item: tuple, result: BatchResult) -> None:
        """The newest connection of a session keeps it; any other is closed with 4000.

        Opens from different ingresses can arrive in either order, so "newest" is the time the
        connection was accepted, not the order the opens arrive in.
        """
        _, sid, principal, connection_id, opened_at = item
        session = self.actors.session(sid, principal)
        current = (session.ingress, session.connection_id, session.opened_at)
        if current[1] is None or current[1] == connection_id or opened_at >= current[2]:
            session.attach(connection_id, ingress, opened_at)
            if current[1] is None or current[1] == connection_id:
                return
            loser_ingress, loser = current[0], current[1]
        else:
            loser_ingress, loser = ingress, connection_id  # an older one that arrived late
        result.deliveries[loser_ingress].append(  # type: ignore[index]
            (CLOSE, loser, protocol.CloseCode.TAKEN_OVER, "session taken over")
        )

    # Subscriptions

    def _subscribe(self, ingress: str, item: tuple, result: BatchResult) -> None:
        _, _, topic_filter, sid, principal, connection_id, flags = item
        self.routes.add(topic_filter, ingress)  # a set: the ingress's other subscribers share it
        self._route_session(sid, topic_filter)
        previous = self.sessions_at.get(sid)
        if previous is not None and previous.away_since is not None:
            self._unmark_away(sid, previous)
        self.sessions_at[sid] = SessionRoute(ingress, principal)
        if flags & SUB_SEND_RETAINED:
            deliveries = result.deliveries[ingress]
            for frame in self.retained_for(topic_filter):
                deliveries.append((RETAINED, connection_id, frame))

    def retained_for(self, topic_filter: str) -> list[bytes]:
        """Retained messages, and drones' last telemetry, on topics the filter matches."""
        found: dict[str, bytes] = {}
        if has_wildcard(topic_filter):
            for topic, frame in self.retained.items():
                if matches(topic_filter, topic):
                    found[topic] = frame
            for drone in self.actors.drones():
                last = drone.last_telemetry_frame
                topic = f"drone/{drone.drone_id}/telemetry"
                if last is not None and topic not in found and matches(topic_filter, topic):
                    found[topic] = last
        else:
            exact = self.retained.get(topic_filter)
            if exact is None and topic_filter.startswith("drone/"):
                owner = self.actors.principals.get(DRONE_PREFIX + topic_filter[6:].split("/")[0])
                if isinstance(owner, Drone) and topic_filter.endswith("/telemetry"):
                    exact = owner.last_telemetry_frame
            if exact is not None:
                found[topic_filter] = exact
        return list(found.values())

    def _retain(self, result: BatchResult, topic: str, frame: bytes) -> None:
        """The last retained message of a topic; one whose data is null clears it (as MQTT).
        QoS 0 has no answer: past the drone's retained-topic limit it is delivered, not kept."""
        if not self.retained.room_for(topic, self.limits.retained_per_drone):
            self.counters.retained_refused += 1
            return
        if codec.decode_frame(frame).get("data") is None:
            self.retained.pop(topic, None)
            result.retained_changes[topic] = None
        else:
            self.retained[topic] = frame
            result.retained_changes[topic] = frame

    # QoS 1

    def plan(
        self,
        request_id: int | None,
        ingress: str | None,
        topic: str,
        frame: bytes,
        retain: bool,
        principal: str,
        msg_id: str,
    ) -> PublicationPlan:
        drone = command_target(topic)
        owner = DRONE_PREFIX + drone if drone else None
        recipients = []
        where = []
        for sid in self.session_routes.match(topic):
            route = self.sessions_at.get(sid)
            if route is None:
                continue
            recipients.append(Recipient(sid, owner is not None and route.principal == owner))
            where.append((sid, route.ingress))
        retain_mode = 0
        if retain:
            retain_mode = 2 if codec.decode_frame(frame).get("data") is None else 1
        publication = Publication(
            principal, msg_id, topic, frame, tuple(recipients), retain_mode, drone
        )
        return PublicationPlan(request_id, ingress, publication, tuple(where))

    def stored(self, plan: PublicationPlan, outcome: Stored, result: BatchResult) -> None:
        """The store took ``plan``: answer the publisher and send the message on."""
        if plan.request_id is not None and plan.ingress is not None:
            if not outcome.replicated:  # a failover now could lose it: no puback yet
                answer = ("unavailable", "stored, not yet confirmed by replicas; send it again")
            else:
                answer = ("dup" if outcome.duplicate else "ok", outcome.offset)
            result.replies.append((plan.ingress, plan.request_id, answer))
        if outcome.duplicate:
            self.counters.duplicates += 1
            return
        self.counters.stored += 1
        publication = plan.publication
        if publication.retain == 1:
            self.retained[publication.topic] = publication.frame
        elif publication.retain == 2:
            self.retained.pop(publication.topic, None)
        for (sid, ingress), seq in zip(plan.recipients, outcome.seqs, strict=True):
            if seq < 0:  # no record in Redis: expired if away; if held, its record is coming
                route = self.sessions_at.get(sid)
                if route is None or route.away_since is not None:
                    self._forget_session(sid)
                continue
            result.deliveries[ingress].append((SESSION_MSG, sid, seq, publication.frame))

    def _route_session(self, sid: str, topic_filter: str) -> None:
        self.session_routes.add(topic_filter, sid)
        self.session_filters[sid].add(topic_filter)

    def _unroute_session(self, sid: str, topic_filter: str) -> None:
        self.session_routes.remove(topic_filter, sid)
        filters = self.session_filters.get(sid)
        if filters is not None:
            filters.discard(topic_filter)
            if not filters:  # nothing of it routed here any more
                self._forget_session(sid)

    def _forget_session(self, sid: str) -> None:
        for topic_filter in self.session_filters.pop(sid, ()):
            self.session_routes.remove(topic_filter, sid)
        route = self.sessions_at.pop(sid, None)
        if route is not None and route.away_since is not None:
            self._unmark_away(sid, route)

    def _mark_away(self, sid: str, route: SessionRoute, now_ms: int) -> None:
        """No connection holds ``sid`` now. An identity keeps at most twice its connection
        limit of away sessions routed here, the newest: a client that reconnects fresh in a loop
        (instead of resuming) must not multiply every QoS 1 message by its abandoned sessions."""
        if route.away_since is not None:
            return
        route.away_since = now_ms
        away = self.away_sessions.setdefault(route.principal, {})
        away[sid] = None
        keep = 2 * self.limits.for_principal(route.principal)
        while len(away) > keep:
            oldest = next(iter(away))
            self.counters.away_sessions_dropped += 1
            self._forget_session(oldest)

    def _unmark_away(self, sid: str, route: SessionRoute) -> None:
        away = self.away_sessions.get(route.principal)
        if away is not None:
            away.pop(sid, None)
            if not away:
                del self.away_sessions[route.principal]

    def expire_session_routes(self, now_ms: int, ttl_ms: int) -> int:
        """Stop routing to sessions away for longer than their TTL (Redis has expired them)."""
        expired = [
            sid
            for sid, route in self.sessions_at.items()
            if route.away_since is not None and now_ms - route.away_since > ttl_ms
        ]
        for sid in expired:
            self._forget_session(sid)
        return len(expired)

    # Presence (PROTOCOL.md, "Presence")

    def presence(
        self, drone_id: str, online: bool, reason: str | None, now_ms: int
    ) -> PublicationPlan:
        topic = f"drone/{drone_id}/status"
        data: dict[str, Any] = {"online": online}
        if not online:
            data["reason"] = reason or "closed"
        frame = codec.encode_msgpack(protocol.msg_frame(topic, data, 1, ROUTER_SENDER, now_ms))
        return self.plan(None, None, topic, frame, True, ROUTER_SENDER, uuid.uuid4().hex)

    def _disconnect(
        self, principal: str, connection_id: str, reason: str, result: BatchResult, now_ms: int
    ) -> None:
        actor = self.actors.principals.get(principal)
        if actor is None:
            return
        if actor.disconnect(connection_id) and isinstance(actor, Drone):
            result.durable.append(self.presence(actor.drone_id, False, reason, now_ms))
        self.actors.deactivate_if_idle(principal)

    def forget_ingress(self, ingress: str, now_ms: int) -> BatchResult:
        """An ingress restarted or left: its routes and connections are gone; drones it held
        that have no other connection go offline."""
        result = BatchResult()
        self.routes.remove_holder(ingress)
        for sid, route in list(self.sessions_at.items()):
            if route.ingress == ingress and route.away_since is None:
                self._mark_away(sid, route, now_ms)
        for principal, actor in list(self.actors.principals.items()):
            had = actor.online
            lost = actor.drop_ingress(ingress) and had and not actor.online
            if lost and isinstance(actor, Drone):
                result.durable.append(
                    self.presence(actor.drone_id, False, "router process lost", now_ms)
                )
            self.actors.deactivate_if_idle(principal)
        self.actors.drop_ingress(ingress, now_ms)
        return result

    # Resharding

    def release(self, owns: Callable[[str], bool]) -> dict[str, int]:
        """Forget what another shard owns now (``owns(ring key)`` says what is this one's):
        exact routes, retained messages, virtual actors. Wildcard routes stay (every shard
        has them). Nobody is told: the new owner holds the same from the ingresses."""
        released = {"routes": 0, "session_routes": 0, "retained": 0, "actors": 0}
        for trie, counter in ((self.routes, "routes"), (self.session_routes, "session_routes")):
            for topic_filter, holder in trie.holders():
                if not has_wildcard(topic_filter) and not owns(placement_key(topic_filter)):
                    trie.remove(topic_filter, holder)
                    released[counter] += 1
        for sid, filters in list(self.session_filters.items()):
            filters.difference_update(
                [f for f in filters if not has_wildcard(f) and not owns(placement_key(f))]
            )
            if not filters:
                self._forget_session(sid)
        for topic in [t for t in self.retained if not owns(placement_key(t))]:
            del self.retained[topic]
            released["retained"] += 1
        for principal in [p for p in self.actors.principals if not owns(ring_key(p))]:
            del self.actors.principals[principal]
            self.dirty_telemetry.discard(principal)
            released["actors"] += 1
        for sid in [s for s in self.actors.sessions if not owns(session_ring_key(s))]:
            del self.actors.sessions[sid]
            released["actors"] += 1
        return released

    # Recovery after a restart of this shard's process

    def restore_session(
        self, sid: str, principal: str, ingress: str, filters: Iterable[str], now_ms: int
    ) -> None:
        """A session stored in Redis whose filters this shard routes (wildcards, own topics).

        It counts as away until an ingress that holds it says so again (its resync).
        """
        for topic_filter in filters:
            self._route_session(sid, topic_filter)
        if sid not in self.sessions_at:
            route = self.sessions_at[sid] = SessionRoute(ingress, principal)
            self._mark_away(sid, route, now_ms)

    def restore_telemetry(self, drone_id: str, frame: bytes, ts: int) -> None:
        drone = self.actors.drone(drone_id)
        if drone.last_telemetry_ts is None or drone.last_telemetry_ts < ts:
            drone.last_telemetry_frame = frame
            drone.last_telemetry_ts = ts

    def reconcile_presence(self, now_ms: int) -> list[PublicationPlan]:
        """After a restart, make every drone's retained status say what is true now: offline
        for drones no connection holds any more (held by a process that died meanwhile),
        online for drones that connected while their status could not be stored."""
        plans = []
        said: dict[str, bool] = {}
        for topic, frame in self.retained.items():
            if topic.startswith("drone/") and topic.endswith("/status") and topic.count("/") == 2:
                data = codec.decode_frame(frame).get("data")
                if isinstance(data, dict) and isinstance(data.get("online"), bool):
                    said[topic[6:-7]] = data["online"]
        for drone_id, online in said.items():
            actor = self.actors.principals.get(DRONE_PREFIX + drone_id)
            if online and (actor is None or not actor.online):
                plans.append(self.presence(drone_id, False, "router process lost", now_ms))
        for drone in self.actors.drones():
            if drone.online and not said.get(drone.drone_id, False):
                plans.append(self.presence(drone.drone_id, True, None, now_ms))
        return plans

    def take_dirty_telemetry(self) -> dict[str, tuple[bytes, int]]:
        out = {}
        for principal in self.dirty_telemetry:
            drone = self.actors.principals.get(principal)
            if isinstance(drone, Drone) and drone.last_telemetry_frame is not None:
                out[drone.drone_id] = (drone.last_telemetry_frame, drone.last_telemetry_ts or 0)
        self.dirty_telemetry.clear()
        return out

    def stats(self) -> dict[str, Any]:
        drones = self.actors.drones()
        return {
            "shard": self.name,
            "filters": len(self.routes),
            "session_filters": len(self.session_routes),
            "routed": self.counters.routed,
            "delivered": self.counters.delivered,
            "unrouted": self.counters.unrouted,
            "stored": self.counters.stored,
            "duplicates": self.counters.duplicates,
            "retained_refused": self.counters.retained_refused,
            "away_sessions_dropped": self.counters.away_sessions_dropped,
            "batches": self.counters.batches,
            "principals": len(self.actors.principals),
            "sessions": len(self.actors.sessions),
            "retained": len(self.retained),
            "drones_online": sum(1 for d in drones if d.online),
            "drones_known": len(drones),
        }

    def drone_snapshots(self) -> list[dict[str, Any]]:
        return [d.snapshot() for d in self.actors.drones()]
