"""Sessions at the ingress: QoS 1 delivery in seq order, acks, and the session's record in Redis.

:class:`AttachedSession` is a session while a connection holds it. The pure part is
:class:`sentientedge.delivery.SessionDelivery`; this class runs it against the store: it
fetches what the delivery asks for, writes acknowledgements (coalesced, at most one write per
session every ``ACK_FLUSH_S``), and copies a drone's queued commands into its session.

Rules for this module:
- Everything a session must deliver is in Redis first; memory only holds what is about to go out.
  So any failure here (Redis away, a fetch lost) is repaired by the next fetch, never by guessing.
- ``send`` is the connection's: it gets (seq, frame, dup) in increasing seq order and queues;
  ``flush`` writes what was queued. Live offers come in batches, whose caller flushes once.
- :class:`SessionKeeper` keeps the sessions' records (subscriptions, time to live) of one
  ingress in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

from sentientedge.delivery import Fetch, SessionDelivery
from sentientedge.errors import StoreUnavailable
from sentientedge.records import SessionRecord
from sentientedge.store import Store

log = logging.getLogger(__name__)

ACK_FLUSH_S = 0.02
GAP_WAIT_S = 0.05  # a missing seq usually arrives from another shard within milliseconds
RETRY_S = 1.0

Send = Callable[[int, bytes, bool], None]
Flush = Callable[[], object]


class AttachedSession:
    def __init__(
        self,
        session_id: str,
        principal: str,
        store: Store,
        window: int,
        send: Send,
        flush: Flush,
        record: SessionRecord | None = None,
    ) -> None:
        self.session_id = session_id
        self.principal = principal
        self.drone_id = principal[6:] if principal.startswith("drone:") else None
        self._store = store
        self._send = send
        self._flush = flush
        if record is None:
            self.delivery = SessionDelivery(acked=0, window=window)
        else:
            self.delivery = SessionDelivery.resumed(record.acked, record.seq, window)
        self._stored_ack = self.delivery.acked
        self._ack_task: asyncio.Task[None] | None = None
        self._fetch_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._closed = False
        # Set when the identity resumed with narrower rights: frames it may no longer read are
        # passed over (and ``on_unreadable`` counts them) instead of sent.
        self.readable: Callable[[bytes], bool] | None = None
        self.on_unreadable: Callable[[], object] | None = None

    # Events

    def offer(self, seq: int, frame: bytes) -> None:
        """A stored message of this session, live from a shard; the caller flushes."""
        self.delivery.offer(seq, frame)
        self.pump(flush=False)

    def learn_last(self, seq: int) -> None:
        """Redis holds messages up to ``seq`` for this session (fetched if not yet here)."""
        if seq > self.delivery.known_last:
            self.delivery.learn_last(seq)
            self.pump()

    def probe_soon(self) -> None:
        """Look in Redis for messages stored but not sent on (a shard died in between)."""
        if self._probe_task is None and not self._closed:
            self._probe_task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        try:
            seqs = await self._store.session_seqs([self.session_id])
            if self.session_id in seqs:
                self.learn_last(seqs[self.session_id])
        except StoreUnavailable as exc:
            log.warning("session %s: probe failed: %s", self.session_id, exc)
        finally:
            self._probe_task = None

    async def resumed_here(self) -> None:
        """The resumed session is routed here now; everything stored until now may have gone to
        the old connection, so it goes out again flagged dup."""
        try:
            seqs = await self._store.session_seqs([self.session_id])
        except StoreUnavailable as exc:
            log.warning("session %s: probe failed: %s", self.session_id, exc)
            seqs = {}
        last = seqs.get(self.session_id, 0)
        self.delivery.redeliver_until = max(self.delivery.redeliver_until, last)
        self.delivery.learn_last(last)
        self.pump()

    def ack(self, seq: int) -> None:
        if self.delivery.ack(seq):
            self.pump()
            if self._ack_task is None:
                self._ack_task = asyncio.get_running_loop().create_task(self._store_acks())

    async def bind_commands(self) -> None:
        """The drone subscribed to its command topic: queue its waiting commands here too."""
        if self.drone_id is None:
            return
        try:
            copied = await self._store.bind_commands(self.session_id, self.drone_id)
        except StoreUnavailable as exc:
            log.warning("session %s: commands not bound: %s", self.session_id, exc)
            return
        for seq, frame in copied:
            self.delivery.offer(seq, frame)
        self.pump()

    def close(self) -> None:
        self._closed = True
        if self._fetch_task is not None:
            self._fetch_task.cancel()

    async def flush_acks(self) -> None:
        """Store the last acknowledgement now (the connection is closing)."""
        if self._ack_task is not None:
            self._ack_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ack_task
            self._ack_task = None
        await self._write_ack()

    # Work

    def pump(self, *, flush: bool = True) -> None:
        if self._closed:
            return
        ready = self.delivery.take_ready()
        readable = self.readable
        for seq, frame, dup in ready:
            if readable is not None and not readable(frame):
                self.delivery.pass_over(seq)
                if self.on_unreadable is not None:
                    self.on_unreadable()
                continue
            self._send(seq, frame, dup)
        if self.delivery.acked > self._stored_ack and self._ack_task is None:
            self._ack_task = asyncio.get_running_loop().create_task(self._store_acks())
        if ready and flush:
            self._flush()
        if self._fetch_task is None:
            fetch = self.delivery.fetch_needed()
            if fetch is not None:
                gap = bool(self.delivery.waiting)
                self._fetch_task = asyncio.get_running_loop().create_task(self._fetch(fetch, gap))

    async def _fetch(self, fetch: Fetch, gap: bool) -> None:
        try:
            if gap:
                await asyncio.sleep(GAP_WAIT_S)
                if self.delivery.next_seq in self.delivery.waiting:  # it arrived meanwhile
                    self.delivery.failed()
                    return
            try:
                messages = await self._store.session_messages(
                    self.session_id, fetch.first_seq, fetch.count
                )
            except StoreUnavailable as exc:
                log.warning("session %s: fetch failed: %s", self.session_id, exc)
                self.delivery.failed()
                await asyncio.sleep(RETRY_S)
                return
            self.delivery.fetched(messages)
        finally:
            self._fetch_task = None
            if not self._closed:
                self.pump()

    async def _store_acks(self) -> None:
        try:
            while not self._closed and self._stored_ack < self.delivery.acked:
                await asyncio.sleep(ACK_FLUSH_S)
                if not await self._write_ack():
                    await asyncio.sleep(RETRY_S)
        finally:
            self._ack_task = None

    async def _write_ack(self) -> bool:
        acked = self.delivery.acked
        if acked <= self._stored_ack:
            return True
        try:
            await self._store.ack(self.session_id, acked, self.drone_id)
        except StoreUnavailable as exc:
            log.warning("session %s: ack not stored: %s", self.session_id, exc)
            return False
        self._stored_ack = max(self._stored_ack, acked)
        return True


class Holder(Protocol):
    """What the keeper needs of a connection that holds a session."""

    session_id: str
    principal: str
    session: AttachedSession

    @property
    def subscriptions(self) -> AbstractSet[str]: ...

    @property
    def holds(self) -> bool: ...


class SessionKeeper:
    """Sessions' records in Redis for one ingress: made when a session starts, its subscriptions
    saved as they change, kept alive while held (``SESSION_TTL`` counts from the last touch), and
    touched once more when its connection ends, so the session can be resumed for a TTL.

    It also looks, every ``PROBE_INTERVAL_S``, for QoS 1 messages stored for a held session but
    never sent on to it (a shard died between storing and sending): one pipelined read for all.
    A write Redis cannot take now is tried again while the connection lasts.
    """

    PROBE_INTERVAL_S = 5.0
    RETRY_S = 0.5

    def __init__(
        self,
        store: Store,
        ingress: str,
        session_ttl: float,
        held: Callable[[], Mapping[str, Holder]],
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self.store = store
        self.ingress = ingress
        self._touch_every = max(1.0, session_ttl / 3)
        self._held = held
        self._spawn = spawn

    def _record(self, holder: Holder) -> dict[str, tuple[str, list[str]]]:
        return {holder.session_id: (holder.principal, sorted(holder.subscriptions))}

    async def create(self, holder: Holder) -> None:
        try:
            await self.store.create_session(holder.session_id, holder.principal, self.ingress)
        except StoreUnavailable as exc:
            # QoS 0 works without it (and no QoS 1 is stored while Redis is away); the record
            # is made as soon as Redis answers again.
            log.warning("session %s not stored yet: %s", holder.session_id, exc)
            self._until_stored(holder, "session record")

    def save_subscriptions(self, holder: Holder) -> None:
        async def save() -> None:
            try:
                await self.store.save_subscriptions(holder.session_id, sorted(holder.subscriptions))
            except StoreUnavailable as exc:
                log.warning("session %s: subscriptions not stored yet: %s", holder.session_id, exc)
                self._until_stored(holder, "subscriptions")

        self._spawn(save())

    def _until_stored(self, holder: Holder, what: str) -> None:
        """Write the session's record (with its subscriptions) until Redis takes it."""

        async def retry() -> None:
            while holder.holds:
                await asyncio.sleep(self.RETRY_S)
                try:
                    await self.store.touch_sessions(self._record(holder), self.ingress)
                    return
                except StoreUnavailable:
                    continue
            log.info("session %s: %s given up, the connection is gone", holder.session_id, what)

        self._spawn(retry())

    async def leave(self, holder: Holder) -> None:
        """The connection ended: store its last ack; SESSION_TTL counts from now."""
        try:
            await holder.session.flush_acks()
            await self.store.touch_sessions(self._record(holder), self.ingress)
        except StoreUnavailable as exc:
            log.warning("session %s: not refreshed on close: %s", holder.session_id, exc)

    async def run(self) -> None:
        last_touch = 0.0
        while True:
            await asyncio.sleep(self.PROBE_INTERVAL_S)
            try:
                held = dict(self._held())
                if time.monotonic() - last_touch >= self._touch_every:
                    records = {
                        sid: (h.principal, sorted(h.subscriptions)) for sid, h in held.items()
                    }
                    await self.store.touch_sessions(records, self.ingress)
                    last_touch = time.monotonic()
                behind: dict[str, int] = {}
                for sid, seq in (await self.store.session_seqs(list(held))).items():
                    holder = self._held().get(sid)
                    if holder is None:
                        continue
                    holder.session.learn_last(seq)
                    known = holder.session.delivery.known_last
                    if seq < known:  # Redis lost its last writes (a crash within the fsync
                        behind[sid] = known  # interval): seqs must never be handed out twice
                if behind:
                    await self.store.raise_seqs(behind)
            except StoreUnavailable as exc:
                log.warning("sessions not refreshed: %s", exc)
            except Exception:
                log.exception("session refresh failed")
