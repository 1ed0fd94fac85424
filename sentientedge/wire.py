"""The streams between router processes (ingress <-> topic shard), without I/O.

A stream carries frames: a 4-byte big-endian length, then one MessagePack array. The opening
frames authenticate both ends; every later frame is a batch:

    server -> client   [CHALLENGE, nonce]
    client -> server   [HELLO, name, epoch, received, nonce, proof of the server's nonce]
    server -> client   [HELLO, name, epoch, received, proof of the client's nonce]
    either way         [seq, ack, items]

``epoch`` names a process: it changes when Ray starts an actor again. ``received`` is the last
batch seq this end handled from the peer's current epoch (0 when it knows none). ``seq`` numbers
batches that carry items (0: an ack alone); ``ack`` is the last seq handled from the peer.

Rules for this module:
- A batch is handled once per process: a resend after a reconnect to the same process skips
  what the peer already handled (its ``received``); after a peer's restart everything kept goes
  again, to a process that never saw it. So items must be idempotent, not exactly-once.
- :class:`LinkState` keeps the items ``keep`` says must not be lost (everything but QoS 0)
  until the peer acks their batch, and a request until its reply comes, since a peer that died
  after handling it took the reply with it.
- A request is an item whose second element is its request id (an int); its answer is the item
  ``(REPLY, request_id, result)`` on the way back.
- Pure: no sockets, no clock, no asyncio.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack

from sentientedge.errors import SentientEdgeError

CHALLENGE = "challenge"
HELLO = "hello"
REPLY = "R"  # (REPLY, request_id, result)

# A sanity bound against a corrupt or hostile length prefix, far above any real batch: a batch
# holds at most MAX_ITEMS items of at most a client frame (MAX_FRAME_BYTES) each.
MAX_WIRE_FRAME_BYTES = 256 * 2**20
MAX_ITEMS = 1024
_LENGTH = 4

Item = tuple[Any, ...]


class WireError(SentientEdgeError):
    """A stream carried something that is not a frame of this protocol: the stream is closed."""


def encode(message: Any) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return len(body).to_bytes(_LENGTH, "big") + body


def link_key(secret: str) -> bytes:
    """The key both ends prove they hold, derived from a secret every router process has."""
    return hmac.new(secret.encode(), b"sentientedge stream link v1", hashlib.sha256).digest()


def proof(key: bytes, nonce: bytes, name: str, epoch: str) -> bytes:
    return hmac.new(key, nonce + b"\0" + name.encode() + b"\0" + epoch.encode(), "sha256").digest()


def proof_ok(key: bytes, nonce: bytes, name: str, epoch: str, claimed: Any) -> bool:
    return isinstance(claimed, bytes) and hmac.compare_digest(
        proof(key, nonce, name, epoch), claimed
    )


class FrameReader:
    """Bytes in (any split), whole frames out: ``feed(data)`` returns the frames completed."""

    def __init__(self, max_frame_bytes: int = MAX_WIRE_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_frame_bytes

    def feed(self, data: bytes) -> list[Any]:
        buffer = self._buffer
        buffer += data
        frames = []
        start = 0
        end = len(buffer)
        while end - start >= _LENGTH:
            size = int.from_bytes(buffer[start : start + _LENGTH], "big")
            if size > self._max:
                raise WireError(f"frame of {size} bytes, more than {self._max}")
            if end - start - _LENGTH < size:
                break
            body = buffer[start + _LENGTH : start + _LENGTH + size]
            try:
                frames.append(msgpack.unpackb(body, raw=False, use_list=False))
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                raise WireError(f"undecodable frame: {type(exc).__name__}") from None
            start += _LENGTH + size
        if start:
            del buffer[:start]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def is_batch(frame: Any) -> bool:
    return (
        type(frame) is tuple
        and len(frame) == 3
        and type(frame[0]) is int
        and type(frame[1]) is int
        and type(frame[2]) is tuple
    )


class LinkState:
    """One end's bookkeeping of a link, across reconnects (see the module's rules)."""

    def __init__(self, keep: Callable[[Item], bool]) -> None:
        self.keep = keep
        self.sent_seq = 0  # the last seq given to an outgoing batch
        self.received = 0  # the last incoming seq handled, from ``peer_epoch``
        self.peer_epoch: str | None = None
        self.unacked: deque[tuple[int, list[Item]]] = deque()  # (seq, kept items)
        self.pending: dict[int, Item] = {}  # request id -> request, until its reply
        self._handled_requests: list[int] = []  # acked but unanswered, in order
        self.owes_ack = False

    def number(self, items: list[Item]) -> int:
        """The seq of an outgoing batch; what must not be lost is kept until it is acked."""
        self.sent_seq += 1
        keep = self.keep
        kept = [item for item in items if keep(item)]
        if kept:
            self.unacked.append((self.sent_seq, kept))
        return self.sent_seq

    def acked(self, seq: int) -> None:
        unacked, pending = self.unacked, self.pending
        while unacked and unacked[0][0] <= seq:
            for item in unacked.popleft()[1]:
                if len(item) > 1 and type(item[1]) is int and item[1] in pending:
                    self._handled_requests.append(item[1])

    def accept(self, seq: int) -> bool:
        """Whether an incoming batch is new (False: handled before a reconnect; skip it)."""
        if seq <= self.received:
            return False
        self.received = seq
        self.owes_ack = True
        return True

    def answered(self, request_id: int) -> Item | None:
        request = self.pending.pop(request_id, None)
        if len(self._handled_requests) > 2 * len(self.pending) + 64:
            self._handled_requests = [r for r in self._handled_requests if r in self.pending]
        return request

    def reconnected(self, peer_epoch: str, peer_received: int) -> tuple[bool, list[Item]]:
        """The peer said hello: whether it is a new process, and what to send it again first.

        The same process: the batches it did not handle (its ``received`` says which). A new
        one: every kept item and every unanswered request, in the order they were first sent.
        """
        restarted = self.peer_epoch is not None and self.peer_epoch != peer_epoch
        if self.peer_epoch == peer_epoch:
            # Requests it handled stay out: their replies come from it.
            self.acked(peer_received)
            again = [item for _, kept in self.unacked for item in kept]
        else:
            handled = [self.pending[r] for r in self._handled_requests if r in self.pending]
            again = handled + [item for _, kept in self.unacked for item in kept]
            self._handled_requests = []
            self.received = 0
        self.unacked.clear()
        self.peer_epoch = peer_epoch
        return restarted, again

    def forget(self) -> list[Item]:
        """Give up on the peer: drop what was kept; returns the requests that get no answer."""
        lost = list(self.pending.values())
        self.pending.clear()
        self._handled_requests = []
        self.unacked.clear()
        return lost
