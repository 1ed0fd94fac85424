"""Batching with one call in flight, over an injected transport (no Ray needed)."""

from __future__ import annotations

import asyncio

import pytest

from sentientedge.channel import Channel
from sentientedge.errors import CallRejected, RouterUnavailable


class RecordingTransport:
    """Holds each call until released, and records the batches it got."""

    def __init__(self) -> None:
        self.batches: list[list[tuple]] = []
        self.release = asyncio.Event()
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, batch: list[tuple]) -> list[tuple[int, object]]:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.batches.append(batch)
        await self.release.wait()
        self.in_flight -= 1
        return [(item[1], ("ok", item[2])) for item in batch if item[0] == "req"]


async def test_items_queue_behind_the_call_in_flight_and_keep_order():
    transport = RecordingTransport()
    channel = Channel("dest", transport)
    channel.push(("p", "m0"))
    await asyncio.sleep(0)  # the first call leaves with one item
    for n in range(1, 100):
        channel.push(("p", f"m{n}"))
    transport.release.set()
    await _until(lambda: sum(len(b) for b in transport.batches) == 100)
    assert [len(b) for b in transport.batches] == [1, 99]
    assert [i[1] for b in transport.batches for i in b] == [f"m{n}" for n in range(100)]
    assert transport.max_in_flight == 1
    await channel.close()


async def test_requests_get_their_replies():
    transport = RecordingTransport()
    transport.release.set()
    channel = Channel("dest", transport)
    futures = [channel.request(("req", n, f"x{n}")) for n in range(5)]
    assert await asyncio.gather(*futures) == [("ok", f"x{n}") for n in range(5)]
    await channel.close()


async def test_a_destination_down_for_good_fails_requests_after_the_give_up_time():
    async def broken(batch):
        raise ConnectionError("gone")

    channel = Channel("dest", broken, give_up_s=0.3)
    channel.push(("p", "m"))
    future = channel.request(("req", 1, "x"))
    with pytest.raises(RouterUnavailable):
        await future
    assert channel.items_lost == 1
    assert channel.retries >= 1
    await channel.close()


async def test_a_restarting_destination_gets_kept_items_again_in_order():
    """Calls fail while the destination restarts; requests and kept items go again, QoS 0 not."""
    delivered: list[tuple] = []
    failures = {"left": 3}

    async def flaky(batch):
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("restarting")
        delivered.extend(batch)
        return [(item[1], "ok") for item in batch if item[0] == "req"]

    channel = Channel("dest", flaky, keep=lambda item: item[0] == "control")
    channel.push(("qos0", "lost"))
    channel.push(("control", "c1"))
    future = channel.request(("req", 7, "stored"))
    channel.push(("control", "c2"))
    assert await asyncio.wait_for(future, 10) == "ok"
    await _until(lambda: len(delivered) == 3)
    assert delivered == [("control", "c1"), ("req", 7, "stored"), ("control", "c2")]
    assert channel.items_lost == 1
    await channel.close()


async def test_backlog_is_bounded():
    transport = RecordingTransport()
    channel = Channel("dest", transport, max_backlog=10)
    results = [channel.push(("p", n)) for n in range(20)]
    assert results.count(False) >= 9
    assert channel.extend([("p", n) for n in range(5)]) == 5
    transport.release.set()
    await channel.close()


async def _until(condition, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


async def test_a_call_the_destination_rejects_is_not_retried():
    calls = []

    async def buggy(batch):
        calls.append(batch)
        raise CallRejected("shard-0.from_ingress: IndexError")

    channel = Channel("dest", buggy, keep=lambda item: True)
    future = channel.request(("req", 1, "x"))
    with pytest.raises(RouterUnavailable):
        await future
    channel.push(("control", "next"))
    await _until(lambda: len(calls) == 2)
    assert [len(b) for b in calls] == [1, 1]  # the next call carries only the new item
    await channel.close()


async def test_giving_up_is_reported_so_state_can_be_registered_again():
    gave_up = []

    async def broken(batch):
        raise ConnectionError("gone")

    channel = Channel(
        "dest",
        broken,
        keep=lambda item: True,
        give_up_s=0.2,
        on_give_up=lambda: gave_up.append(True),
    )
    channel.push(("control", "c"))
    await _until(lambda: gave_up, timeout=5)
    await channel.close()
