"""Batching to one destination with one call in flight at a time.

A Ray call costs 0.5-1 ms of CPU on each side here, and about the same whatever the batch holds,
so a message never gets a call of its own. Items queue while a call is in flight and all go in
the next one: under light load a batch holds one item and leaves at once.

One call in flight alone is not enough on a small machine: a busy link would call again as soon
as the last call returns, about a thousand times a second, and a handful of links would spend
both cores on call overhead. So a process also keeps a call budget (:class:`CallPacer`, setting
``BATCH_CALLS_PER_S``): a link that called less than ``active links / budget`` seconds ago waits
out the rest of that interval before its next call. An idle link still sends at once; a busy one
sends bigger batches, and the process's calls per second stay within its budget.

Rules for this module:
- The transport is injected (``send``: a coroutine function taking a list of items and returning
  the replies ``[(request_id, result), ...]``), so this is tested without Ray.
- Items keep their order: a destination sees them in the order they were pushed.
- A call the destination rejected (it raised: :class:`CallRejected`) is not retried: its
  requests fail and its items are dropped, logged.
- A failed call (the destination died, or is restarting: Ray fails such calls at once) is
  retried with a bounded, jittered backoff, carrying every item ``keep`` says must not be lost
  (requests, QoS 1, control items), in their order, ahead of anything queued since; the rest
  (QoS 0) is counted as lost. Items are idempotent, so a call that did run before its reply was
  lost does no harm run again. After ``give_up_s`` of failing calls the channel fails its
  requests with :class:`RouterUnavailable` and drops what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sentientedge.errors import CallRejected, RouterUnavailable

Send = Callable[[list[tuple]], Awaitable[list[tuple[int, Any]] | None]]

log = logging.getLogger(__name__)

_request_ids = itertools.count(1)


def next_request_id() -> int:
    return next(_request_ids)


class CallPacer:
    """The call budget of one process, shared by its channels."""

    def __init__(self, calls_per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.calls_per_s = calls_per_s
        self.clock = clock
        self._last_call: dict[str, float] = {}

    def record(self, destination: str, now: float) -> None:
        self._last_call[destination] = now

    def interval(self, now: float) -> float:
        """Seconds a link waits between the starts of two calls: active links over the budget."""
        horizon = now - 1.0
        active = sum(1 for t in self._last_call.values() if t >= horizon)
        return max(active, 1) / self.calls_per_s


UNPACED = CallPacer(float("inf"))


class Channel:
    def __init__(
        self,
        destination: str,
        send: Send,
        *,
        pacer: CallPacer = UNPACED,
        max_batch: int = 4096,
        max_backlog: int = 100_000,
        keep: Callable[[tuple], bool] | None = None,
        give_up_s: float = 30.0,
        on_give_up: Callable[[], None] | None = None,
    ) -> None:
        self.destination = destination
        self._send = send
        self._pacer = pacer
        self._keep = keep if keep is not None else (lambda item: False)
        self._give_up_s = give_up_s
        self._on_give_up = on_give_up
        self._failing_since: float | None = None
        self._retry_delay = 0.0
        self._last_start = float("-inf")
        self._max_batch = max_batch
        self._max_backlog = max_backlog
        self._items: list[tuple] = []
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._in_call = False
        self.calls = 0
        self.items_sent = 0
        self.items_lost = 0
        self.failures = 0
        self.retries = 0

    def push(self, item: tuple, *, control: bool = False) -> bool:
        """Queue a fire-and-forget item; False (and not queued) when the backlog is full.

        ``control`` items (a disconnect, an unsubscribe) keep the router's books right and are
        few: the backlog bound, which is there for messages, does not refuse them.
        """
        if self._closed or (not control and len(self._items) >= self._max_backlog):
            return False
        self._items.append(item)
        self._kick()
        return True

    async def warm(self) -> None:
        """Make one empty call, so the first real batch does not pay for connection set-up.

        A first call to an actor resolves its handle and opens a connection to its process:
        hundreds of milliseconds that would otherwise land on the first messages.
        """
        await self._send([])

    def extend(self, items: list[tuple]) -> int:
        """Queue fire-and-forget items in order; returns how many did not fit and were lost."""
        room = self._max_backlog - len(self._items)
        if self._closed:
            room = 0
        taken = items if len(items) <= room else items[: max(room, 0)]
        if taken:
            self._items.extend(taken)
            self._kick()
        lost = len(items) - len(taken)
        self.items_lost += lost
        return lost

    def request(self, item: tuple) -> asyncio.Future[Any]:
        """Queue an item whose second element is a request id; the future gets its reply."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(RouterUnavailable(f"{self.destination}: channel closed"))
            return future
        self._pending[item[1]] = future
        self._items.append(item)
        self._kick()
        return future

    def _kick(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wakeup.set()

    async def _run(self) -> None:
        while not self._closed:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._items and not self._closed:
                pacer = self._pacer
                now = pacer.clock()
                wait = self._last_start + max(pacer.interval(now), self._retry_delay) - now
                if wait > 0:
                    await asyncio.sleep(wait)
                    now = pacer.clock()
                self._last_start = now
                pacer.record(self.destination, now)
                if len(self._items) <= self._max_batch:
                    batch, self._items = self._items, []
                else:
                    batch = self._items[: self._max_batch]
                    del self._items[: self._max_batch]
                await self._call(batch)

    async def _call(self, batch: list[tuple]) -> None:
        self.calls += 1
        self._in_call = True
        try:
            replies = await self._send(batch)
        except asyncio.CancelledError:
            self._fail(batch, RouterUnavailable(f"{self.destination}: channel closed"))
            raise
        except Exception as exc:
            self._failed(batch, exc)
            return
        finally:
            self._in_call = False
        self._failing_since = None
        self._retry_delay = 0.0
        self.items_sent += len(batch)
        for request_id, result in replies or ():
            future = self._pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(result)
        if not self._pending:
            return
        # A request the destination did not answer must not wait forever.
        for item in batch:
            if len(item) > 1 and isinstance(item[1], int):
                future = self._pending.pop(item[1], None)
                if future is not None and not future.done():
                    future.set_exception(RouterUnavailable(f"{self.destination}: no reply"))

    def _failed(self, batch: list[tuple], exc: Exception) -> None:
        self.failures += 1
        if isinstance(exc, CallRejected):
            log.error("%s rejected a batch of %d: %s", self.destination, len(batch), exc)
            self._fail(batch, RouterUnavailable(f"{self.destination}: call rejected"))
            return
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            log.warning("call to %s failed (%d items): %s", self.destination, len(batch), exc)
        if now - self._failing_since > self._give_up_s:
            error = RouterUnavailable(f"{self.destination}: {type(exc).__name__}")
            log.error("%s unreachable for %.0f s: giving up", self.destination, self._give_up_s)
            self._fail(batch + self._items, error)
            self._items = []
            self._failing_since = None
            self._retry_delay = 0.0
            if self._on_give_up is not None:  # what was dropped must be registered again
                self._on_give_up()
            return
        kept = [item for item in batch if self._keep(item) or self._is_request(item)]
        self.items_lost += len(batch) - len(kept)
        self._items[:0] = kept
        self._retry_delay = min(max(self._retry_delay * 2, 0.05), 1.0) * (0.5 + random.random())
        self.retries += 1
        self._wakeup.set()

    def _is_request(self, item: tuple) -> bool:
        return len(item) > 1 and type(item[1]) is int and item[1] in self._pending

    def _fail(self, batch: list[tuple], exc: Exception) -> None:
        for item in batch:
            future = self._pending.pop(item[1], None) if len(item) > 1 else None
            if future is not None:
                if not future.done():
                    future.set_exception(exc)
            else:
                self.items_lost += 1

    async def drain(self, timeout: float) -> None:
        """Wait until everything queued has been sent (or ``timeout`` passes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._items or self._in_call) and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail(self._items, RouterUnavailable(f"{self.destination}: channel closed"))
        self._items = []
