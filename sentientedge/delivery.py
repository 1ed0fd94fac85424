"""QoS 1 delivery to one session, as a pure state machine (no I/O, fed and drained).

Rules for this module:
- Every QoS 1 message of a session has a ``seq`` (1, 2, 3, ...) assigned when it was stored.
  The client's ``ack n`` acknowledges every seq up to n (PROTOCOL.md, "Client to server"), so the
  session must send seqs in increasing order with no gap: a client that acked 6 before 5 arrived
  would lose 5. Messages that arrive out of order (from different shards) wait for the gap.
- At most ``window`` messages are sent and unacknowledged at once (flow control). Messages
  beyond the window are not held in memory: they are stored in Redis, and the session fetches
  them when the window opens. Likewise a gap that does not fill by itself is fetched.
- Messages are offered from three places: live from a shard, the backlog on resume, and
  fetches from Redis. An offer of a seq already sent is ignored. On resume every seq the session
  had stored before (``redeliver_until``) may have reached the old connection: it goes out again
  with ``dup: true``.
- A message the session's identity may no longer read (its rights were narrowed before it
  resumed) is passed over: not sent, and counted as acknowledged once every seq before it is,
  so it holds neither the window nor the client's acknowledgements of earlier messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Frame = bytes


@dataclass(frozen=True)
class Fetch:
    """Read the session's stored messages from ``first_seq`` on, at most ``count``."""

    first_seq: int
    count: int


@dataclass
class SessionDelivery:
    acked: int
    window: int
    next_seq: int = 0  # the next seq to send
    known_last: int = 0  # the highest seq known to exist (stored), sent or not
    redeliver_until: int = 0  # seqs up to this one may have been sent before: flag them dup
    waiting: dict[int, tuple[Frame, bool]] = field(default_factory=dict)
    fetching: bool = False
    max_fetch: int = 500
    passed: set[int] = field(default_factory=set)  # seqs passed over, not yet below ``acked``

    def __post_init__(self) -> None:
        self.next_seq = max(self.next_seq, self.acked + 1)
        self.known_last = max(self.known_last, self.acked, self.redeliver_until)

    @classmethod
    def resumed(cls, acked: int, last_seq: int, window: int) -> SessionDelivery:
        """A session resumed with ``last_seq`` stored and ``acked`` acknowledged."""
        return cls(acked=acked, window=window, known_last=last_seq, redeliver_until=last_seq)

    @property
    def unacked(self) -> int:
        return self.next_seq - 1 - self.acked

    @property
    def window_open(self) -> bool:
        return self.next_seq <= self.acked + self.window

    def offer(self, seq: int, frame: Frame) -> None:
        """A stored message of this session became known."""
        if seq > self.known_last:
            self.known_last = seq
        if seq < self.next_seq or seq > self.acked + self.window:
            return  # already sent, or beyond the window: fetched from Redis when it opens
        self.waiting.setdefault(seq, (frame, seq <= self.redeliver_until))

    def learn_last(self, seq: int) -> None:
        """Messages up to ``seq`` are stored for this session (they are fetched if not here)."""
        self.known_last = max(self.known_last, seq)

    def ack(self, seq: int) -> bool:
        """The client acknowledged up to ``seq``; True when that moved anything."""
        # A client cannot ack what it was not sent; after a resume it may ack what the old
        # connection sent, before the redelivery got here.
        seq = min(seq, max(self.next_seq - 1, self.redeliver_until))
        if seq <= self.acked:
            return False
        self.acked = seq
        if self.next_seq <= seq:  # acked before they were sent again: don't send them
            self.next_seq = seq + 1
            for stale in [s for s in self.waiting if s <= seq]:
                del self.waiting[stale]
        self._absorb_passed()
        return True

    def pass_over(self, seq: int) -> None:
        """``seq`` (taken from :meth:`take_ready`) is not sent: the identity may not read it."""
        self.passed.add(seq)
        self._absorb_passed()

    def _absorb_passed(self) -> None:
        passed = self.passed
        if not passed:
            return
        while self.acked + 1 in passed and self.acked + 1 < self.next_seq:
            self.acked += 1
            passed.discard(self.acked)
        for stale in [s for s in passed if s <= self.acked]:
            passed.discard(stale)

    def take_ready(self) -> list[tuple[int, Frame, bool]]:
        """Messages to send now, in seq order: contiguous from ``next_seq``, within the window."""
        ready = []
        waiting = self.waiting
        limit = self.acked + self.window
        while self.next_seq <= limit:
            entry = waiting.pop(self.next_seq, None)
            if entry is None:
                break
            ready.append((self.next_seq, entry[0], entry[1]))
            self.next_seq += 1
        return ready

    def fetch_needed(self) -> Fetch | None:
        """What to read from Redis: the gap at ``next_seq`` or messages the window held back.

        Called after ``take_ready``; returns nothing while a fetch is already under way.
        """
        if self.fetching or not self.window_open:
            return None
        if self.next_seq in self.waiting or self.next_seq > self.known_last:
            return None
        self.fetching = True
        room = self.acked + self.window - self.next_seq + 1
        return Fetch(self.next_seq, min(room, self.known_last - self.next_seq + 1, self.max_fetch))

    def fetched(self, messages: list[tuple[int, Frame]]) -> None:
        self.fetching = False
        if not messages:
            if self.next_seq <= self.known_last:
                # Redis holds nothing from there on: acked by another connection of the session,
                # or expired. Skip past them rather than wait forever.
                self.acked = max(self.acked, self.known_last)
                self.next_seq = self.known_last + 1
            return
        first = messages[0][0]
        if first > self.next_seq:  # the ones before it are gone for the same reasons
            self.acked = max(self.acked, first - 1)
            self.next_seq = first
        for seq, frame in messages:
            self.offer(seq, frame)

    def failed(self) -> None:
        """A fetch could not be done (Redis away); the next event tries again."""
        self.fetching = False
