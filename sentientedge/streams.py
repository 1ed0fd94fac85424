"""Direct streams between router processes: the data plane (Ray is the control plane).

A topic shard listens on a Unix domain socket (peers on the same machine) and on TCP (peers on
other nodes), and advertises both through its actor; an ingress connects to every shard and
keeps one full-duplex stream to each: items one way, deliveries and replies the other. The
frames and the bookkeeping that survives a reconnect are :mod:`sentientedge.wire`.

Rules for this module:
- Batches are cut by what is in flight, never by a timer: items queue during a turn of the event
  loop and leave together at its end, one write. Nothing else paces the data path.
- Backpressure comes from the transport: above its high-water mark it stops taking writes and
  items wait in the queue; past ``max_backlog`` waiting items, ``push`` refuses anything but
  control items (the caller drops QoS 0 and says ``queue_full``).
- A dropped stream reconnects by itself (the client side resolves the shard's address again:
  after a restart it has a new one). Items are resent per :class:`sentientedge.wire.LinkState`.
- One task per link for connecting; none per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from sentientedge import wire
from sentientedge.errors import RouterUnavailable
from sentientedge.wire import CHALLENGE, HELLO, REPLY, FrameReader, Item, LinkState, WireError

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 5.0
WRITE_HIGH_WATER = 1 << 20
RETRY_MAX_S = 1.0

OnItems = Callable[[list[Item]], None]
Resolve = Callable[[], Awaitable[dict[str, Any]]]


def host_id() -> str:
    """This machine, as peers compare it: same host id, so a Unix socket path reaches it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            boot_id = boot.read().strip()
    except OSError:
        boot_id = ""
    return f"{socket.gethostname()}/{boot_id}"


class _Connection(asyncio.Protocol):
    """One socket: frames in, bytes out. The handshake, then batches to its :class:`LinkEnd`."""

    def __init__(
        self, on_frame: Callable[[_Connection, Any], None], greeting: bytes | None = None
    ) -> None:
        self._on_frame = on_frame
        self._greeting = greeting
        self._reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.end: LinkEnd | None = None
        self.paused = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as ones.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self._greeting is not None:
            transport.write(self._greeting)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except WireError as exc:
            log.error("stream from %s: %s; closing it", self.peer, exc)
            self.close()
            return
        for frame in frames:
            if self.transport is None or self.transport.is_closing():
                return
            self._on_frame(self, frame)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.end is not None:
            self.end.schedule()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.end is not None:
            self.end.detach(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def peer(self) -> str:
        return self.end.peer if self.end is not None else "a peer"


class LinkEnd:
    """This process's end of the link to one peer: its queue, its requests, and the stream it
    writes to while one is up (see the module's rules)."""

    def __init__(
        self,
        peer: str,
        on_items: OnItems,
        *,
        keep: Callable[[Item], bool],
        resend_to_new_peer: bool,
        max_backlog: int = 100_000,
    ) -> None:
        self.peer = peer
        self.state = LinkState(keep)
        self._on_items = on_items
        self._resend_to_new_peer = resend_to_new_peer
        self._max_backlog = max_backlog
        self._queue: list[Item] = []
        self._waiters: dict[int, asyncio.Future[Any] | Callable[[Any], None]] = {}
        self._connection: _Connection | None = None
        self._scheduled = False
        self._held = False
        self._loop = asyncio.get_running_loop()
        self.on_peer_restart: Callable[[], None] = lambda: None
        self.detached_at: float | None = time.monotonic()
        self.sent_items = 0
        self.lost_items = 0
        self.batches_out = 0
        self.batches_in = 0

    # Sending

    @property
    def connected(self) -> bool:
        return self._connection is not None

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def push(self, item: Item, *, control: bool = False) -> bool:
        """Queue an item; False (not queued) when the backlog is full and it is not control.

        ``control`` items (a disconnect, an unsubscribe) keep the books right and are few: the
        bound, which is there for messages, does not refuse them.
        """
        if not control and len(self._queue) >= self._max_backlog:
            self.lost_items += 1
            return False
        self._queue.append(item)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)
        return True

    def extend(self, items: list[Item]) -> int:
        """Queue items in order; returns how many did not fit (and were dropped)."""
        room = self._max_backlog - len(self._queue)
        if room < len(items):
            taken = items[: max(room, 0)]
            self.lost_items += len(items) - len(taken)
        else:
            taken = items
        if taken:
            self._queue.extend(taken)
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self._flush)
        return len(items) - len(taken)

    def request(self, item: Item) -> asyncio.Future[Any]:
        """Queue a request (its second element is its id); its reply resolves the future, or a
        :class:`RouterUnavailable` when none will come."""
        future: asyncio.Future[Any] = self._loop.create_future()
        self._ask(item, future)
        return future

    def request_then(self, item: Item, on_reply: Callable[[Any], None]) -> None:
        """As :meth:`request`, the reply (or the error) handed to ``on_reply``: no future."""
        self._ask(item, on_reply)

    def _ask(self, item: Item, waiter: asyncio.Future[Any] | Callable[[Any], None]) -> None:
        self.state.pending[item[1]] = item
        self._waiters[item[1]] = waiter
        self.push(item, control=True)

    def schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def hold(self) -> None:
        """Queue without sending until :meth:`release` (a reshard's fence: what the new owner
        of a topic gets must not overtake what its old owner still stores)."""
        self._held = True

    def release(self) -> None:
        self._held = False
        self.schedule()

    def flush(self) -> None:
        """Send what is queued now, not at the end of this turn."""
        self._flush()

    def waiting(self) -> set[int]:
        """Ids of the requests still waiting for their replies."""
        return set(self._waiters)

    def _flush(self) -> None:
        self._scheduled = False
        connection = self._connection
        if connection is None or connection.paused or self._held:
            return
        state = self.state
        queue = self._queue
        while queue:
            if len(queue) <= wire.MAX_ITEMS:
                batch, queue = queue, []
                self._queue = queue
            else:
                batch = queue[: wire.MAX_ITEMS]
                del queue[: wire.MAX_ITEMS]
            seq = state.number(batch)
            state.owes_ack = False
            connection.write(wire.encode((seq, state.received, batch)))
            self.sent_items += len(batch)
            self.batches_out += 1
            if connection.paused:  # the transport is full: the rest waits for resume_writing
                return
        if state.owes_ack:
            state.owes_ack = False
            connection.write(wire.encode((0, state.received, ())))

    # Receiving

    def on_batch(self, frame: tuple[int, int, tuple[Item, ...]]) -> None:
        seq, ack, items = frame
        state = self.state
        if ack:
            state.acked(ack)
        if not seq:
            return
        if not state.accept(seq):
            return  # handled before the reconnect
        self.batches_in += 1
        self.schedule()  # the ack, with whatever this turn sends back
        if not items:
            return
        rest: list[Item] = []
        for item in items:
            if item[0] == REPLY:
                self._answer(item[1], item[2])
            else:
                rest.append(item)
        if rest:
            try:
                self._on_items(rest)
            except Exception:  # the handler guards each item; this guards the stream
                log.exception("handling a batch from %s failed", self.peer)

    def _answer(self, request_id: int, result: Any) -> None:
        self.state.answered(request_id)
        waiter = self._waiters.pop(request_id, None)
        if waiter is None:
            return
        if isinstance(waiter, asyncio.Future):
            if not waiter.done():
                waiter.set_result(result)
        else:
            waiter(result)

    # The stream under it

    def attach(self, connection: _Connection, peer_epoch: str, peer_received: int) -> None:
        """A stream to the peer is up and both ends said hello."""
        old = self._connection
        if old is not None and old is not connection:
            old.end = None
            old.close()
        restarted, again = self.state.reconnected(peer_epoch, peer_received)
        if restarted and not self._resend_to_new_peer:
            # What was meant for the previous process means nothing to this one.
            self._queue.clear()
            again = []
        connection.end = self
        self._connection = connection
        self.detached_at = None
        if again:
            self._queue[:0] = again
        if restarted:
            self.on_peer_restart()
        self.schedule()

    def detach(self, connection: _Connection) -> None:
        if self._connection is connection:
            self._connection = None
            self.detached_at = time.monotonic()

    def give_up(self, reason: str) -> None:
        """The peer is unreachable for good: fail its requests, drop what waits for it."""
        self.lost_items += len(self._queue)
        self._queue = []
        self.state.forget()
        waiters, self._waiters = self._waiters, {}
        error = RouterUnavailable(f"{self.peer}: {reason}")
        for waiter in waiters.values():
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    waiter.set_exception(error)
            else:
                waiter(error)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.end = None
            self._connection.close()
            self._connection = None
        self.give_up("link closed")

    def stats(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "backlog": len(self._queue),
            "unacked_batches": len(self.state.unacked),
            "pending_requests": len(self.state.pending),
            "sent_items": self.sent_items,
            "lost_items": self.lost_items,
            "batches_out": self.batches_out,
            "batches_in": self.batches_in,
        }


class StreamLink(LinkEnd):
    """The client end (an ingress's link to one shard): connects, says hello, and connects again
    whenever the stream drops, to whatever address ``resolve`` gives then."""

    def __init__(
        self,
        name: str,
        epoch: str,
        peer: str,
        resolve: Resolve,
        key: bytes,
        on_items: OnItems,
        *,
        keep: Callable[[Item], bool],
        max_backlog: int = 100_000,
        give_up_s: float = 30.0,
    ) -> None:
        super().__init__(
            peer, on_items, keep=keep, resend_to_new_peer=True, max_backlog=max_backlog
        )
        self.name = name
        self.epoch = epoch
        self._resolve = resolve
        self._key = key
        self._give_up_s = give_up_s
        self._here = host_id()
        self._ready = asyncio.Event()
        self._lost_track = False
        self._task: asyncio.Task[None] | None = None
        self.connects = 0

    def start(self) -> None:
        if self._task is None:
            self._task = self._loop.create_task(self._keep_connected())

    async def wait_connected(self, timeout: float) -> bool:
        self.start()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self._ready.is_set()

    async def _keep_connected(self) -> None:
        delay = 0.05
        failing_since: float | None = None
        while True:
            connection = None
            try:
                connection = await self._connect()
                self.connects += 1
                if self.connects > 1:
                    log.info("stream to %s up again", self.peer)
                delay, failing_since = 0.05, None
                self._ready.set()
                await connection.closed
                log.warning("stream to %s dropped; reconnecting", self.peer)
            except asyncio.CancelledError:
                if connection is not None:
                    connection.close()
                raise
            except Exception as exc:
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning("stream to %s: %s", self.peer, _describe(exc))
                if now - failing_since > self._give_up_s and not self._lost_track:
                    log.error("%s unreachable for %.0f s: giving up", self.peer, self._give_up_s)
                    self.give_up(f"unreachable for {self._give_up_s:.0f} s")
                    self._lost_track = True  # register everything again once it is back
            self._ready.clear()
            await asyncio.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
            delay = min(delay * 2, RETRY_MAX_S)

    async def _connect(self) -> _Connection:
        address = await self._resolve()
        loop = self._loop
        handshake: asyncio.Future[tuple[str, int]] = loop.create_future()
        nonce = secrets.token_bytes(16)

        def on_frame(connection: _Connection, frame: Any) -> None:
            if connection.end is not None:
                if wire.is_batch(frame):
                    connection.end.on_batch(frame)
                return
            if handshake.done():
                return
            if frame[0] == CHALLENGE and len(frame) == 2:
                connection.write(
                    wire.encode(
                        (
                            HELLO,
                            self.name,
                            self.epoch,
                            self.state.received if self.state.peer_epoch else 0,
                            nonce,
                            wire.proof(self._key, frame[1], self.name, self.epoch),
                        )
                    )
                )
            elif frame[0] == HELLO and len(frame) == 5:
                _, peer, peer_epoch, received, answer = frame
                if peer != self.peer or not wire.proof_ok(
                    self._key, nonce, peer, peer_epoch, answer
                ):
                    handshake.set_exception(WireError("the peer failed to prove the link key"))
                else:
                    handshake.set_result((peer_epoch, received))
            else:
                handshake.set_exception(WireError(f"unexpected {str(frame[0])[:20]!r}"))

        factory = lambda: _Connection(on_frame)  # noqa: E731
        if address.get("host") == self._here and address.get("unix"):
            _, connection = await loop.create_unix_connection(factory, address["unix"])
        else:
            host, port = address["tcp"]
            _, connection = await loop.create_connection(factory, host, port)
        try:
            peer_epoch, received = await asyncio.wait_for(handshake, HANDSHAKE_TIMEOUT_S)
        except BaseException:
            connection.close()
            raise
        if self._lost_track:
            self._lost_track = False
            self.state.peer_epoch = None  # a restart as far as the books go: register again
            self.attach(connection, peer_epoch, received)
            self.on_peer_restart()
        else:
            self.attach(connection, peer_epoch, received)
        return connection

    async def close(self) -> None:  # type: ignore[override]
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        super().close()


class StreamListener:
    """The server end (a shard): accepts ingresses' streams, one :class:`LinkEnd` per peer,
    kept across reconnects of the same peer process."""

    def __init__(
        self,
        name: str,
        epoch: str,
        key: bytes,
        on_items: Callable[[str, list[Item]], None],
        *,
        keep: Callable[[Item], bool],
        on_peer_restart: Callable[[str], None] = lambda peer: None,
        max_backlog: int = 100_000,
    ) -> None:
        self.name = name
        self.epoch = epoch
        self._key = key
        self._on_items = on_items
        self._keep = keep
        self._on_peer_restart = on_peer_restart
        self._max_backlog = max_backlog
        self.ends: dict[str, LinkEnd] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_path: str | None = None

    def end(self, peer: str) -> LinkEnd:
        found = self.ends.get(peer)
        if found is None:
            found = self.ends[peer] = LinkEnd(
                peer,
                lambda items: self._on_items(peer, items),
                keep=self._keep,
                resend_to_new_peer=False,
                max_backlog=self._max_backlog,
            )
            found.on_peer_restart = lambda: self._on_peer_restart(peer)
        return found

    async def start(self, unix_path: str | None, tcp_host: str | None) -> dict[str, Any]:
        """Listen; returns the address to advertise (``host``, ``unix``, ``tcp``)."""
        loop = asyncio.get_running_loop()
        address: dict[str, Any] = {"host": host_id(), "epoch": self.epoch}
        if unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(unix_path)
            server = await loop.create_unix_server(self._accept, unix_path)
            os.chmod(unix_path, 0o600)  # only this user's processes
            self._servers.append(server)
            self._unix_path = unix_path
            address["unix"] = unix_path
        if tcp_host is not None:
            server = await loop.create_server(self._accept, tcp_host, 0)
            self._servers.append(server)
            address["tcp"] = list(server.sockets[0].getsockname()[:2])
        return address

    def _accept(self) -> _Connection:
        nonce = secrets.token_bytes(16)
        connection = _Connection(
            lambda conn, frame: self._on_frame(conn, frame, nonce),
            greeting=wire.encode((CHALLENGE, nonce)),
        )
        asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT_S, self._unless_said_hello, connection
        )
        return connection

    @staticmethod
    def _unless_said_hello(connection: _Connection) -> None:
        """A peer that never says hello is not kept waiting on."""
        if connection.end is None:
            connection.close()

    def _on_frame(self, connection: _Connection, frame: Any, nonce: bytes) -> None:
        end = connection.end
        if end is not None:
            if wire.is_batch(frame):
                end.on_batch(frame)
            return
        if not (type(frame) is tuple and len(frame) == 6 and frame[0] == HELLO):
            log.warning("%s: a stream opened without hello; closing it", self.name)
            connection.close()
            return
        _, peer, peer_epoch, received, peer_nonce, claimed = frame
        if not (isinstance(peer, str) and isinstance(peer_epoch, str)) or not wire.proof_ok(
            self._key, nonce, peer, peer_epoch, claimed
        ):
            log.warning("%s: a stream failed to prove the link key; closing it", self.name)
            connection.close()
            return
        end = self.end(peer)
        known = end.state.peer_epoch == peer_epoch
        connection.write(
            wire.encode(
                (
                    HELLO,
                    self.name,
                    self.epoch,
                    end.state.received if known else 0,
                    wire.proof(self._key, peer_nonce, self.name, self.epoch),
                )
            )
        )
        end.attach(connection, peer_epoch, received if isinstance(received, int) else 0)

    def expire(self, idle_s: float) -> list[str]:
        """Forget peers whose stream has been down for ``idle_s``: what waits for them goes."""
        now = time.monotonic()
        gone = [
            peer
            for peer, end in self.ends.items()
            if end.detached_at is not None and now - end.detached_at > idle_s
        ]
        for peer in gone:
            self.ends.pop(peer).give_up("gone")
        return gone

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for end in self.ends.values():
            end.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:200]
