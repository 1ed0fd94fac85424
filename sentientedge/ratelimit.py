"""Per-connection rate limits and abuse guards (PROTOCOL.md, "Rate limits" and "Client to server").

Rules for this module:
- Pure: time comes from an injected clock (seconds, monotonic), so tests advance it by hand.
- A guard answers with a :class:`Verdict`; the connection acts on it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from enum import Enum

Clock = Callable[[], float]


class Verdict(Enum):
    PASS = "pass"
    DROP = "drop"  # drop silently: the client was told less than a second ago
    DROP_AND_TELL = "drop_and_tell"  # drop and answer rate_limited
    CLOSE = "close"  # far over the limit for too long: close with 1008


class TokenBucket:
    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def take(self, amount: float = 1.0, now: float | None = None) -> bool:
        if now is None:
            now = self._clock()
        tokens = self._tokens + (now - self._last) * self.rate
        self._last = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens >= amount:
            self._tokens = tokens - amount
            return True
        self._tokens = tokens
        return False


class RateGuard:
    """The rate limit of one connection.

    Over the limit a message is dropped; the client hears ``rate_limited`` at most once a second.
    A connection is "far over" when, within ``window_s``, it had more messages dropped than the
    limit lets through in that window: it keeps sending at least twice its rate. It is closed.
    """

    # One per connection: slots, not a __dict__ (300 bytes) each.
    __slots__ = (
        "_bucket",
        "_bytes",
        "_clock",
        "_drop_budget",
        "_drops",
        "_last_told",
        "_window_s",
        "dropped",
    )

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Clock = time.monotonic,
        window_s: float = 10.0,
        bytes_per_s: float | None = None,
    ) -> None:
        self._bucket = TokenBucket(rate, burst, clock)
        # Messages alone do not bound a connection: 100 frames of 64 KB a second is 6.5 MB/s.
        self._bytes = (
            None if bytes_per_s is None else TokenBucket(bytes_per_s, 2 * bytes_per_s, clock)
        )
        self._clock = clock
        self._window_s = window_s
        self._drop_budget = rate * window_s
        # Made on the first drop: ten thousand well-behaved connections need none.
        self._drops: deque[float] | None = None
        self._last_told = float("-inf")
        self.dropped = 0

    @classmethod
    def for_drone(
        cls, hz: int, clock: Clock = time.monotonic, bytes_per_s: float | None = None
    ) -> RateGuard:
        return cls(rate=hz, burst=2 * hz, clock=clock, bytes_per_s=bytes_per_s)

    @classmethod
    def for_person(
        cls, per_minute: int, clock: Clock = time.monotonic, bytes_per_s: float | None = None
    ) -> RateGuard:
        return cls(
            rate=per_minute / 60.0,
            burst=per_minute,
            clock=clock,
            window_s=60.0,
            bytes_per_s=bytes_per_s,
        )

    def check(self, size: int = 0) -> Verdict:
        """One message of ``size`` bytes: within both the message and the byte rate?"""
        now = self._clock()
        byte_bucket = self._bytes
        if self._bucket.take(1.0, now) and (byte_bucket is None or byte_bucket.take(size, now)):
            return Verdict.PASS
        self.dropped += 1
        drops = self._drops
        if drops is None:
            drops = self._drops = deque()
        drops.append(now)
        horizon = now - self._window_s
        while drops and drops[0] < horizon:
            drops.popleft()
        if len(drops) > self._drop_budget:
            return Verdict.CLOSE
        if now - self._last_told >= 1.0:
            self._last_told = now
            return Verdict.DROP_AND_TELL
        return Verdict.DROP


class BadFrameGuard:
    """Counts error answers; over ``limit`` in ``window_s``, the client is closed (1008)."""

    __slots__ = ("_clock", "_limit", "_times", "_window_s")  # one per connection

    def __init__(
        self, limit: int = 100, window_s: float = 60.0, clock: Clock = time.monotonic
    ) -> None:
        self._limit = limit
        self._window_s = window_s
        self._clock = clock
        self._times: deque[float] | None = None  # made on the first bad frame

    def record(self) -> bool:
        """Record one bad frame; True when the client is over the limit."""
        now = self._clock()
        times = self._times
        if times is None:
            times = self._times = deque()
        times.append(now)
        horizon = now - self._window_s
        while times and times[0] < horizon:
            times.popleft()
        return len(times) > self._limit


class AddressLimiter:
    """Handshakes per client address: a token bucket each, for the addresses seen lately.

    Bounded: past ``max_addresses`` the least recently seen address is forgotten (it starts
    again with a full bucket, which costs an attacker more addresses than it saves them).
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Clock = time.monotonic,
        max_addresses: int = 65_536,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max = max_addresses
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, address: str) -> bool:
        buckets = self._buckets
        bucket = buckets.get(address)
        if bucket is None:
            bucket = buckets[address] = TokenBucket(self.rate, self.burst, self._clock)
            if len(buckets) > self._max:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(address)
        return bucket.take()

    def retry_after(self) -> int:
        """Seconds until one more handshake is allowed (whole, at least 1)."""
        return max(1, math.ceil(1.0 / self.rate))
