"""The streams between router processes, over real Unix and TCP sockets (no Ray needed here: the
router's failover tests kill real actors on top of them)."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sentientedge import wire
from sentientedge.errors import RouterUnavailable
from sentientedge.streams import StreamLink, StreamListener
from tests.helpers import REPO, eventually

SECRET = "stream-test-secret-" + uuid.uuid4().hex
KEY = wire.link_key(SECRET)


def keep(item: tuple) -> bool:
    return item[0] != "p"  # as in the router: everything but QoS 0 must not be lost


class Shard:
    """An in-process listener that records what it handles and answers requests."""

    def __init__(self, name: str = "shard") -> None:
        self.handled: list[tuple] = []
        self.listener = StreamListener(name, uuid.uuid4().hex[:8], KEY, self.on_items, keep=keep)
        self.address: dict[str, Any] = {}

    def on_items(self, peer: str, items: list[tuple]) -> None:
        self.handled.extend(items)
        for item in items:
            if item[0] == "q":
                self.listener.end(peer).push((wire.REPLY, item[1], ("ok", item[2])))

    async def start(self, directory: str) -> None:
        self.address = await self.listener.start(f"{directory}/s.sock", "127.0.0.1")


@pytest.fixture
async def shard() -> AsyncIterator[Shard]:
    with tempfile.TemporaryDirectory(prefix="se-streams-") as directory:
        started = Shard()
        await started.start(directory)
        yield started
        await started.listener.close()


def link_to(address_of: Any, received: list[tuple] | None = None, **options: Any) -> StreamLink:
    async def resolve() -> dict[str, Any]:
        return address_of() if callable(address_of) else address_of

    return StreamLink(
        "ingress-0",
        uuid.uuid4().hex[:8],
        "shard",
        resolve,
        options.pop("key", KEY),
        (received.extend if received is not None else lambda items: None),
        keep=keep,
        **options,
    )


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_items_arrive_in_order_and_requests_get_their_replies(shard: Shard, transport):
    address = dict(shard.address)
    if transport == "tcp":
        address.pop("unix")  # a peer on another machine has only the TCP address
    link = link_to(address)
    assert await link.wait_connected(5)
    sent = [("p", f"drone/{n}/telemetry", b"m" * n) for n in range(2000)]
    for item in sent:
        assert link.push(item)
    replies = await asyncio.gather(*(link.request(("q", n, f"x{n}")) for n in range(1, 50)))
    assert replies == [["ok", f"x{n}"] for n in range(1, 50)] or replies == [
        ("ok", f"x{n}") for n in range(1, 50)
    ]
    await eventually(lambda: len(shard.handled) == 2049, 5, "every item at the shard")
    assert [item for item in shard.handled if item[0] == "p"] == sent
    await link.close()


async def test_items_sent_back_reach_the_link(shard: Shard):
    received: list[tuple] = []
    link = link_to(shard.address, received)
    assert await link.wait_connected(5)
    link.push(("c", "hello"), control=True)
    await eventually(lambda: shard.handled, 5, "the first item")
    back = shard.listener.end("ingress-0")
    for n in range(500):
        back.push(("m", "session-1", n, b"frame"))
    await eventually(lambda: len(received) == 500, 5, "the deliveries")
    assert [item[2] for item in received] == list(range(500))
    await link.close()


async def test_after_a_dropped_stream_the_same_process_handles_each_item_once(shard: Shard):
    link = link_to(shard.address)
    assert await link.wait_connected(5)
    for round_ in range(20):
        for n in range(100):
            link.push(("c", round_ * 100 + n), control=True)
        await asyncio.sleep(0)
        # Cut the stream from the shard's side, mid-flow: some batches are handled and not yet
        # acked, some not handled at all. The link reconnects and sends again what it must.
        connection = shard.listener.end("ingress-0")._connection
        if connection is not None and connection.transport is not None:
            connection.transport.abort()
    await eventually(lambda: len(shard.handled) >= 2000, 10, "every item")
    await asyncio.sleep(0.2)  # a late duplicate would show up here
    numbers = [item[1] for item in shard.handled]
    assert numbers == list(range(2000)), "each item once, in order"
    assert link.connects > 1
    await link.close()


async def test_backpressure_when_the_peer_stops_reading(shard: Shard):
    link = link_to(shard.address, max_backlog=1000)
    assert await link.wait_connected(5)
    link.push(("c", "first"), control=True)
    await eventually(lambda: shard.handled, 5, "the first item")
    connection = shard.listener.end("ingress-0")._connection
    assert connection is not None and connection.transport is not None
    connection.transport.pause_reading()
    payload = b"x" * 4096
    accepted = 0
    for n in range(100_000):  # far more than the socket buffers and the backlog hold
        if not link.push(("p", "t", payload, n)):
            break
        accepted += 1
        if n % 100 == 0:
            await asyncio.sleep(0)  # let the transport fill
    else:
        pytest.fail("the link never pushed back")
    assert link.backlog == 1000
    assert link.push(("c", "control still goes"), control=True)
    connection.transport.resume_reading()
    await eventually(
        lambda: any(item == ("c", "control still goes") for item in shard.handled),
        10,
        "the backlog to drain",
    )
    qos0 = [item[3] for item in shard.handled if item[0] == "p"]
    assert qos0 == list(range(accepted)), "everything accepted arrives, in order"
    await link.close()


async def test_a_stream_without_the_key_is_refused(shard: Shard):
    link = link_to(shard.address, key=wire.link_key("not-the-cluster-secret"), give_up_s=60)
    assert not await link.wait_connected(1.0)
    assert "ingress-0" not in shard.listener.ends
    await link.close()


async def test_requests_fail_when_the_peer_stays_unreachable():
    with tempfile.TemporaryDirectory(prefix="se-streams-") as directory:
        link = link_to({"host": "elsewhere", "tcp": ["127.0.0.1", 9]}, give_up_s=0.3)
        link.start()
        future = link.request(("q", 1, "x"))
        with pytest.raises(RouterUnavailable):
            await asyncio.wait_for(future, 10)  # type: ignore[arg-type]
        assert not Path(directory, "s.sock").exists()
        await link.close()


class PeerProcess:
    """``tests/e2e/stream_peer.py`` in a process of its own: a listener to SIGKILL."""

    def __init__(self, directory: str, index: int) -> None:
        self.log = f"{directory}/handled.log"
        self.address_file = f"{directory}/address-{index}.json"
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests" / "e2e" / "stream_peer.py"),
                "--unix",
                f"{directory}/peer-{index}.sock",
                "--address-file",
                self.address_file,
                "--log",
                self.log,
                "--secret",
                SECRET,
            ],
            cwd=REPO,
        )

    async def address(self) -> dict[str, Any]:
        def read() -> dict[str, Any] | None:
            if not os.path.exists(self.address_file):
                return None
            with open(self.address_file) as source:
                return dict(json.load(source))

        return await eventually(read, 20, "the peer process to listen")  # type: ignore[no-any-return]


async def test_a_peer_killed_mid_batch_loses_nothing_but_qos0():
    """Control items and requests reach the peer's next process; none is handled twice by one
    process (across processes items are idempotent: a subscription registered again, a QoS 1
    message stored again is recognised by its id); only QoS 0 may be lost."""
    with tempfile.TemporaryDirectory(prefix="se-peer-") as directory:
        current = PeerProcess(directory, 0)
        address = await current.address()
        link = link_to(lambda: address)
        assert await link.wait_connected(10)
        restarts = []
        link.on_peer_restart = lambda: restarts.append(True)
        requests = []
        for n in range(3000):
            link.push(("c", n), control=True)
            link.push(("p", n))
            if n % 10 == 0:
                requests.append(link.request(("q", 10_000 + n, n)))
            if n == 1500:  # mid-stream: batches in the socket, in flight, unacked
                current.process.send_signal(signal.SIGKILL)
                current.process.wait(10)
                current = PeerProcess(directory, 1)
                address = await current.address()
            if n % 50 == 0:
                await asyncio.sleep(0.002)
        answers = await asyncio.wait_for(asyncio.gather(*requests), 30)
        assert list(answers) == list(range(0, 3000, 10))
        assert restarts, "the link saw the peer's new epoch"

        def handled() -> dict[str, list[tuple[str, int]]]:
            per_process: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
            with open(current.log) as log:
                for line in log:
                    epoch, kind, n = line.split()
                    per_process[epoch].append((kind, int(n)))
            return per_process

        def all_control_items_in() -> bool:
            seen = {n for items in handled().values() for kind, n in items if kind == "c"}
            return seen == set(range(3000))

        await eventually(all_control_items_in, 20, "every control item at one process or other")
        for epoch, items in handled().items():
            assert len(items) == len(set(items)), f"process {epoch} handled an item twice"
        await link.close()
        current.process.kill()
        current.process.wait(10)
