"""What the router stores, as plain records shared by the shards and the store (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Retention:
    """How long what is stored stays stored."""

    stream_max_len: int = 100_000
    stream_max_age_s: int = 86_400
    dedupe_ttl_s: int = 900
    session_ttl_s: int = 300
    command_ttl_s: int = 86_400  # a drone's queued commands, refreshed by each new one
    command_max_len: int = 1000  # MAX_COMMANDS_PER_DRONE
    session_queue_max: int = 10_000  # SESSION_QUEUE_MAX
    drone_state_ttl_s: int = 7 * 86_400  # a drone's last telemetry


class Recipient(NamedTuple):
    """A session a QoS 1 message is queued for; ``owner``: the drone its command is for."""

    session_id: str
    owner: bool = False


# Publications and their outcomes are made per QoS 1 message: slotted, not frozen (a frozen
# dataclass sets each field through object.__setattr__).
@dataclass(slots=True)
class Publication:
    principal: str
    msg_id: str
    topic: str
    frame: bytes
    recipients: tuple[Recipient, ...]
    retain: int = 0  # 0 keep, 1 set, 2 clear
    command_for: str | None = None  # drone id when the topic is drone/{id}/cmd


@dataclass(slots=True)
class Stored:
    offset: str
    duplicate: bool
    seqs: tuple[int, ...]  # per recipient; -1: the session no longer exists
    # REDIS_WAIT_REPLICAS replicas confirmed it (or none were asked for). When not, the
    # message is stored and delivered, but the publisher hears "unavailable" and sends it again.
    replicated: bool = True


@dataclass(frozen=True)
class SessionRecord:
    principal: str
    seq: int
    acked: int
    subscriptions: tuple[str, ...]
