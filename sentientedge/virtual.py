"""Virtual actors: drones, sessions and people, hosted inside topic-shard processes.

Ten thousand drones cannot be ten thousand processes. As in Orleans' grains or Akka's sharded
entities, each drone, session and person is a small object that lives in the shard the hash
ring assigns its key to, activated on first use and dropped when it holds nothing worth keeping.

Rules for this module:
- Pure: no Ray, no sockets, no clock of its own (times are passed in, in ms since the epoch).
- Ring keys: ``drone/{id}`` (the same key as the drone's topics), ``user/{sub}``,
  ``session/{id}``; see :func:`ring_key`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sentientedge.codec import decode_frame

DRONE_PREFIX = "drone:"
USER_PREFIX = "user:"


def ring_key(principal: str) -> str:
    """Ring key of a principal (``drone:7`` -> ``drone/7``, ``user:alice`` -> ``user/alice``)."""
    kind, _, subject = principal.partition(":")
    return f"{kind}/{subject}"


def session_ring_key(session_id: str) -> str:
    return f"session/{session_id}"


@dataclass
class Principal:
    """Someone who connects: counts their connections across the whole cluster."""

    principal: str
    connections: dict[str, str] = field(default_factory=dict)  # connection id -> ingress

    @property
    def online(self) -> bool:
        return bool(self.connections)

    def connect(self, connection_id: str, ingress: str, limit: int) -> bool:
        """Count a new connection; False when the principal already has ``limit`` of them."""
        if connection_id in self.connections:
            return True
        if len(self.connections) >= limit:
            return False
        self.connections[connection_id] = ingress
        return True

    def disconnect(self, connection_id: str) -> bool:
        """Forget a connection; True when it was the last one."""
        existed = self.connections.pop(connection_id, None) is not None
        return existed and not self.connections

    def drop_ingress(self, ingress: str) -> bool:
        """Forget every connection held by ``ingress`` (it restarted); True if any was dropped."""
        gone = [cid for cid, holder in self.connections.items() if holder == ingress]
        for cid in gone:
            del self.connections[cid]
        return bool(gone)

    @property
    def idle(self) -> bool:
        return not self.connections


@dataclass
class Drone(Principal):
    """A drone: its connections, whether it is online, and where it last said it was."""

    last_telemetry_frame: bytes | None = None  # the msg frame, MessagePack; decoded on demand
    last_telemetry_ts: int | None = None
    last_seen_ts: int | None = None

    @property
    def drone_id(self) -> str:
        return self.principal[len(DRONE_PREFIX) :]

    def observe(self, topic: str, frame: bytes, ts: int) -> None:
        self.last_seen_ts = ts
        if topic.endswith("/telemetry"):
            self.last_telemetry_frame = frame
            self.last_telemetry_ts = ts

    @property
    def last_telemetry(self) -> Any:
        if self.last_telemetry_frame is None:
            return None
        return decode_frame(self.last_telemetry_frame).get("data")

    @property
    def idle(self) -> bool:
        # A drone that reported telemetry stays active: operators ask where it was last.
        return not self.connections and self.last_telemetry_ts is None

    def snapshot(self) -> dict[str, Any]:
        return {
            "drone": self.drone_id,
            "online": self.online,
            "connections": len(self.connections),
            "last_seen": self.last_seen_ts,
            "last_telemetry": self.last_telemetry,
            "last_telemetry_ts": self.last_telemetry_ts,
        }


@dataclass
class Session:
    """A session: whose it is, the connection that holds it, and its subscriptions."""

    session_id: str
    principal: str
    connection_id: str | None = None
    ingress: str | None = None
    subscriptions: set[str] = field(default_factory=set)
    closed_at: int | None = None
    opened_at: int = 0  # when the attached connection was accepted, ms

    def attach(self, connection_id: str, ingress: str, opened_at: int) -> None:
        self.connection_id = connection_id
        self.ingress = ingress
        self.opened_at = opened_at
        self.closed_at = None

    def detach(self, now_ms: int) -> None:
        self.connection_id = None
        self.ingress = None
        self.closed_at = now_ms


class VirtualActors:
    """The virtual actors one shard hosts, activated on first use."""

    def __init__(self) -> None:
        self.principals: dict[str, Principal] = {}
        self.sessions: dict[str, Session] = {}

    def principal(self, principal: str) -> Principal:
        found = self.principals.get(principal)
        if found is None:
            cls = Drone if principal.startswith(DRONE_PREFIX) else Principal
            found = self.principals[principal] = cls(principal)
        return found

    def drone(self, drone_id: str) -> Drone:
        found = self.principal(DRONE_PREFIX + drone_id)
        assert isinstance(found, Drone)
        return found

    def drones(self) -> list[Drone]:
        return [p for p in self.principals.values() if isinstance(p, Drone)]

    def evict_idle_drones(self, now_ms: int, idle_ms: int) -> int:
        """Drop drones with no connection and no news for ``idle_ms`` from memory."""
        stale = [
            key
            for key, actor in self.principals.items()
            if isinstance(actor, Drone)
            and not actor.connections
            and (actor.last_seen_ts or 0) < now_ms - idle_ms
        ]
        for key in stale:
            del self.principals[key]
        return len(stale)

    def deactivate_if_idle(self, principal: str) -> None:
        found = self.principals.get(principal)
        if found is not None and found.idle:
            del self.principals[principal]

    def session(self, session_id: str, principal: str) -> Session:
        found = self.sessions.get(session_id)
        if found is None:
            found = self.sessions[session_id] = Session(session_id, principal)
        return found

    def expire_sessions(self, now_ms: int, ttl_ms: int) -> int:
        expired = [
            sid
            for sid, s in self.sessions.items()
            if s.connection_id is None
            and s.closed_at is not None
            and now_ms - s.closed_at >= ttl_ms
        ]
        for sid in expired:
            del self.sessions[sid]
        return len(expired)

    def drop_ingress(self, ingress: str, now_ms: int) -> None:
        for key in list(self.principals):
            if self.principals[key].drop_ingress(ingress):
                self.deactivate_if_idle(key)
        for session in self.sessions.values():
            if session.ingress == ingress:
                session.detach(now_ms)
