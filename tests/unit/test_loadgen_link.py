"""Lean links (sentientedge.loadgen_link) against an in-memory router, and the fleet's ticks.

No sockets: ``loop.create_connection`` is replaced by a pipe to websockets' own sans-I/O
server, which checks the handshake and every frame the link writes (masking included) as a
real websockets server would.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import msgpack
import pytest
from websockets.datastructures import Headers
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from sentientedge.errors import ConnectRejected
from sentientedge.loadgen_link import Link, Ticker, TickSchedule
from tests.helpers import eventually


class Pipe(asyncio.Transport):
    """The link's transport; the far end is a websockets ServerProtocol run by FakeRouter."""

    def __init__(self, router: FakeRouter, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.router = router
        self.protocol = protocol
        self.server = ServerProtocol(
            subprotocols=[Subprotocol("se1.msgpack"), Subprotocol("se1.json")]
        )
        self.request: Request | None = None
        self.frames: list[dict[str, Any]] = []  # decoded data frames from the link
        self.controls: list[Frame] = []
        self.closed = False
        self._loop = asyncio.get_running_loop()

    # the link's side
    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.server.receive_data(bytes(data))
        for event in self.server.events_received():
            if isinstance(event, Request):
                self.request = event
                self.router.answer(self, event)
            elif event.opcode in (Opcode.BINARY, Opcode.TEXT):
                raw = event.data
                self.frames.append(
                    msgpack.unpackb(raw) if event.opcode is Opcode.BINARY else json.loads(raw)
                )
            else:
                self.controls.append(event)
        assert self.server.parser_exc is None, self.server.parser_exc
        self.flush()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.call_soon(self.protocol.connection_lost, None)

    def close(self) -> None:
        self.abort()

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    # the router's side
    def send(self, frame: dict[str, Any]) -> None:
        self.server.send_binary(msgpack.packb(frame))
        self.flush()

    def flush(self) -> None:
        for chunk in self.server.data_to_send():
            if chunk:  # bytes arrive a moment later, as from a socket
                self._loop.call_soon(self._deliver, chunk)
            else:  # the server closes the TCP connection
                self._loop.call_soon(self.abort)

    def _deliver(self, chunk: bytes) -> None:
        if not self.closed:
            self.protocol.data_received(chunk)


class FakeRouter:
    """Accepts (or refuses) handshakes, welcomes, resumes sessions by ``?session=``."""

    def __init__(self, refuse: tuple[int, dict[str, Any]] | None = None) -> None:
        self.refuse = refuse
        self.pipes: list[Pipe] = []
        self.sessions = 0

    async def create_connection(self, factory: Any, host: str, port: int, **_: Any) -> Any:
        protocol = factory()
        pipe = Pipe(self, protocol)
        self.pipes.append(pipe)
        protocol.connection_made(pipe)
        return pipe, protocol

    def answer(self, pipe: Pipe, request: Request) -> None:
        if self.refuse is not None:
            status, body = self.refuse
            payload = json.dumps(body).encode()
            headers = Headers([("Content-Type", "application/json")])
            headers["Content-Length"] = str(len(payload))
            pipe.server.send_response(Response(status, "Refused", headers, payload))
            pipe.flush()
            return
        pipe.server.send_response(pipe.server.accept(request))
        asked = request.path.partition("session=")[2]
        resumed = bool(asked)
        if not resumed:
            self.sessions += 1
        session = asked or f"s{self.sessions}"
        limits = {"max_frame_bytes": 65536}
        welcome = {"op": "welcome", "session": session, "resumed": resumed, "server": "fake"}
        pipe.send({**welcome, "limits": limits})

    @property
    def last(self) -> Pipe:
        return self.pipes[-1]


class Recorder(Link):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("ws://127.0.0.1:9/ws", api_key="k-1", **kwargs)
        self.messages: list[tuple[dict[str, Any], float]] = []
        self.pubacks: list[tuple[str, float, float]] = []

    def on_message(self, frame: dict[str, Any], now: float) -> None:
        if "seq" in frame and not self.take(frame["seq"]):
            return
        self.messages.append((frame, now))

    def on_puback(self, ident: str, sent: float, now: float) -> None:
        self.pubacks.append((ident, sent, now))


async def opened(fake: FakeRouter, **kwargs: Any) -> Recorder:
    link = Recorder(**kwargs)
    await link.open()
    return link


@pytest.fixture
async def fake() -> Any:
    loop = asyncio.get_running_loop()
    router = FakeRouter()
    loop.create_connection = router.create_connection  # type: ignore[method-assign]
    yield router
    del loop.create_connection  # the loop's own again


async def test_open_sends_credentials_and_subprotocol_and_waits_for_welcome(fake):
    link = await opened(fake)
    request = fake.last.request
    assert request is not None
    assert request.headers["X-API-Key"] == "k-1"
    assert request.headers["Sec-WebSocket-Protocol"] == "se1.msgpack"
    assert link.session == "s1" and not link.resumed and link.is_open
    await link.close()
    assert [Close.parse(c.data).code for c in fake.last.controls] == [1000]


async def test_a_refusal_raises_connect_rejected_with_the_routers_reason(fake):
    fake.refuse = (401, {"error": "unauthorized", "reason": "bad api key"})
    with pytest.raises(ConnectRejected) as refused:
        await opened(fake)
    assert refused.value.status == 401 and refused.value.body["reason"] == "bad api key"


async def test_deliveries_are_stamped_and_qos1_ones_acked_once(fake):
    link = await opened(fake)
    before = time.time()
    for seq in (1, 2, 2, 3):  # 2 comes again (a redelivery): handed over once
        fake.last.send({"op": "msg", "topic": "a/b", "data": {"n": seq}, "qos": 1, "seq": seq})
    fake.last.send({"op": "msg", "topic": "a/c", "data": 0, "qos": 0})
    await eventually(lambda: len(link.messages) == 4, 5, "the deliveries")
    assert [m[0]["topic"] for m in link.messages] == ["a/b", "a/b", "a/b", "a/c"]
    assert all(before <= now <= time.time() for _, now in link.messages)
    await eventually(lambda: [f for f in fake.last.frames if f["op"] == "ack"], 5, "an ack")
    assert [f for f in fake.last.frames if f["op"] == "ack"] == [{"op": "ack", "seq": 3}]
    await link.close()


async def test_pings_are_answered_with_pongs(fake):
    link = await opened(fake)
    fake.last.server.send_ping(b"ka-1")
    fake.last.flush()
    await eventually(lambda: fake.last.controls, 5, "a pong")
    assert [(c.opcode, c.data) for c in fake.last.controls] == [(Opcode.PONG, b"ka-1")]
    await link.close()


async def test_requests_get_their_answer_by_id(fake):
    link = await opened(fake)
    subscribing = asyncio.ensure_future(link.subscribe("drone/+/telemetry"))
    await eventually(lambda: fake.last.frames, 5, "the sub frame")
    sub = fake.last.frames[0]
    assert sub["op"] == "sub" and sub["topics"] == ["drone/+/telemetry"]
    fake.last.send({"op": "suback", "id": sub["id"], "topics": sub["topics"]})
    assert await subscribing == ["drone/+/telemetry"]
    await link.close()


async def test_a_dropped_link_resumes_its_session_and_resends_what_was_not_acknowledged(fake):
    link = await opened(fake)
    link.subscriptions.append("drone/d1/cmd")
    link.publish_durable("drone/d1/event", {"n": 1}, "p-1", 100.0)
    link.publish_durable("drone/d1/event", {"n": 2}, "p-2", 100.5)
    first = fake.last
    first.send({"op": "puback", "id": "p-1", "offset": "1-0"})
    await eventually(lambda: link.pubacks, 5, "the puback of p-1")
    assert link.pubacks[0][:2] == ("p-1", 100.0)
    link.drop()
    await eventually(lambda: link.reconnects == 1 and link.is_open, 10, "the link to resume")
    second = fake.last
    assert second is not first and second.request is not None
    assert "session=s1" in second.request.path
    # The session was resumed: its subscriptions are back without a new sub; p-2 goes again.
    assert [f.get("id") for f in second.frames] == ["p-2"]
    await link.close()


async def test_unavailable_publications_go_again_with_the_same_id(fake):
    link = await opened(fake)
    link.publish_durable("drone/d1/event", {"n": 1}, "p-9", 1.0)
    fake.last.send({"op": "error", "code": "unavailable", "msg": "redis down", "id": "p-9"})
    await eventually(lambda: len(fake.last.frames) == 2, 5, "the publication again")
    assert [f["id"] for f in fake.last.frames] == ["p-9", "p-9"]
    assert link.errors == {"unavailable": 1}
    await link.close()


async def test_a_session_taken_over_is_not_resumed(fake):
    link = await opened(fake)
    fake.last.server.send_close(4000, "taken over")
    fake.last.flush()
    await eventually(lambda: link.gone, 5, "the link to give up")
    assert link.close_code == 4000 and not link.is_open and fake.last.closed
    assert [Close.parse(c.data).code for c in fake.last.controls] == [4000]  # echoed
    assert len(fake.pipes) == 1 and link.reconnects == 0


# Ticks


def test_drones_in_the_same_millisecond_share_a_tick_and_ticks_come_in_time_order():
    phases = [0.0004, 0.0101, 0.0009, 0.015, 0.0105]
    schedule = TickSchedule(start=100.0, period=0.02, end=100.045, phases=phases)
    assert schedule.groups == [[0, 2], [1, 4], [3]]
    assert schedule.pop_due(100.0) == [(0, [0, 2])]
    assert schedule.pop_due(100.0) == []  # each once
    assert schedule.next_due() == pytest.approx(100.01)
    # A stall: everything due meanwhile comes out at once, in order.
    assert schedule.pop_due(100.0349) == [(0, [1, 4]), (0, [3]), (1, [0, 2]), (1, [1, 4])]
    assert schedule.pop_due(1e9) == [(1, [3]), (2, [0, 2])]  # 100.05 is past the end
    assert schedule.next_due() is None


@pytest.mark.parametrize("rate_hz, duration_s", [(50, 3.0), (20, 3.0), (0.05, 20.0), (1000, 0.5)])
def test_every_drone_sends_rate_times_duration_messages(rate_hz, duration_s):
    period = 1 / rate_hz
    phases = [i / 37 * period for i in range(37)]
    schedule = TickSchedule(start=0.0, period=period, end=duration_s, phases=phases)
    sent = [0] * len(phases)
    for tick, members in schedule.pop_due(duration_s + 10):
        for member in members:
            assert tick == sent[member]  # the tick number is the drone's seq
            sent[member] += 1
    expected = round(rate_hz * duration_s)
    assert all(count == expected for count in sent)


async def test_the_ticker_fires_each_due_group_once_and_stops_at_the_end():
    fired: list[tuple[int, list[int]]] = []
    start = time.time() + 0.01
    schedule = TickSchedule(start, period=0.01, end=start + 0.05, phases=[0.0, 0.005])
    ticker = Ticker(schedule, lambda tick, members: fired.append((tick, members)))
    ticker.start()
    await asyncio.wait_for(ticker.done, 5)
    assert fired == [(k, [m]) for k in range(5) for m in (0, 1)]
