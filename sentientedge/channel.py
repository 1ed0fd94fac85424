"""Batching to one destination with one call in flight at a time.

A Ray call costs 0.5-1 ms here, so a message never gets a call of its own. Items queue while a
call is in flight and all go in the next one: under light load a batch holds one item and adds
no delay, under heavy load batches grow and the number of calls stays bounded by the call
latency, not by the message rate. No timer decides when to flush.

Rules for this module:
- The transport is injected (``send``: a coroutine function taking a list of items and returning
  the replies ``[(request_id, result), ...]``), so this is tested without Ray.
- Items keep their order: a destination sees them in the order they were pushed.
- A failed call fails the requests it carried with :class:`RouterUnavailable`; its
  fire-and-forget items are counted as lost (QoS 0 may be lost; QoS 1 never travels as
  fire-and-forget).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sentientedge.errors import RouterUnavailable

Send = Callable[[list[tuple]], Awaitable[list[tuple[int, Any]] | None]]

log = logging.getLogger(__name__)

_request_ids = itertools.count(1)


def next_request_id() -> int:
    return next(_request_ids)


class Channel:
    def __init__(
        self,
        destination: str,
        send: Send,
        *,
        max_batch: int = 2048,
        max_backlog: int = 100_000,
    ) -> None:
        self.destination = destination
        self._send = send
        self._max_batch = max_batch
        self._max_backlog = max_backlog
        self._items: list[tuple] = []
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.calls = 0
        self.items_sent = 0
        self.items_lost = 0
        self.failures = 0

    @property
    def backlog(self) -> int:
        return len(self._items)

    def push(self, item: tuple) -> bool:
        """Queue a fire-and-forget item; False (and not queued) when the backlog is full."""
        if len(self._items) >= self._max_backlog or self._closed:
            return False
        self._items.append(item)
        self._kick()
        return True

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
                if len(self._items) <= self._max_batch:
                    batch, self._items = self._items, []
                else:
                    batch = self._items[: self._max_batch]
                    del self._items[: self._max_batch]
                await self._call(batch)

    async def _call(self, batch: list[tuple]) -> None:
        self.calls += 1
        try:
            replies = await self._send(batch)
        except asyncio.CancelledError:
            self._fail(batch, RouterUnavailable(f"{self.destination}: channel closed"))
            raise
        except Exception as exc:
            self.failures += 1
            log.warning("call to %s failed (%d items): %s", self.destination, len(batch), exc)
            self._fail(batch, RouterUnavailable(f"{self.destination}: {type(exc).__name__}"))
            return
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

    def _fail(self, batch: list[tuple], exc: Exception) -> None:
        for item in batch:
            future = self._pending.pop(item[1], None) if len(item) > 1 else None
            if future is not None:
                if not future.done():
                    future.set_exception(exc)
            else:
                self.items_lost += 1

    async def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail(self._items, RouterUnavailable(f"{self.destination}: channel closed"))
        self._items = []
