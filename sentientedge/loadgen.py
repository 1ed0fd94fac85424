"""Load generation for researchers: simulated fleets against a router, from a notebook.

    from sentientedge.loadgen import Scenario, run

    scenario = Scenario(url="ws://127.0.0.1:4000/ws", drones=200, rate_hz=50, duration_s=30,
                        stations=2, churn=0.05, jwt_secret=..., api_key_secret=...)
    results = run(scenario)                   # a live progress bar; Ctrl-C / interrupt stops early
    results.summary()                         # totals and latency percentiles
    results.to_rows()                         # the per-second timeline, for pandas
    results.plot()                            # throughput over time, latency distribution

The load runs in workers, each driving many simulated drones on one event loop (uvloop): in a
thread of this process (``run(scenario)``), or as Ray actors spread over the cluster's nodes
(``run(scenario, on_ray=True)``, more workers give more load). Stations subscribe and measure;
an operator sends QoS 1 commands that drones answer on ``drone/{id}/cmd/result``; churning
drones cut their connection now and then and resume their session.

The load generator usually shares its machine with the router it measures, so what it costs
per message is taken from the router. Drones and stations are therefore lean links
(:mod:`sentientedge.loadgen_link`: an ``asyncio.Protocol`` each, frames built and parsed by
hand, no task per connection), one ticker sends for every drone of a worker (the drones due
in the same millisecond in one go), each telemetry frame is encoded once and only its ``seq``
and ``sent`` written per message, and stations count in the read callback. The operator, a
few messages a second, is a full :class:`sentientedge.client.Client`.

Rules for this module:
- A scenario is checked before anything starts: bad values, an unreachable router and refused
  credentials fail at once with :class:`ScenarioError` and a message saying what to fix.
- Counting is exact: at the stations, every telemetry message a drone sent is either delivered
  (once) or lost; duplicates are counted apart. Latency is receive time minus send time
  (``time.time()``: across machines it assumes synchronised clocks); the send time is taken
  as the frame is written, the receive time once per read, for every frame the read holds.
- A drone whose link is down (churn) skips its ticks: telemetry is not queued for later, and
  what was not sent is not counted as offered. Its unacknowledged QoS 1 messages are sent
  again, with their ids, when it resumes.
- No Ray import here: the Ray backend is ``actors.load_fleet``, the actor that hosts a
  worker ``actors.load_worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from sentientedge import auth
from sentientedge.client import Client
from sentientedge.errors import ConnectRejected, SentientEdgeError, ServerError
from sentientedge.fleet import telemetry
from sentientedge.loadgen_link import Link, Ticker, TickSchedule
from sentientedge.loadgen_wire import OP_TEXT, TelemetryFrame, client_frame
from sentientedge.topics import matches, validate_filter

PROGRESS_INTERVAL_S = 0.5
CONNECT_CONCURRENCY = 200
DRAIN_S = 2.0  # after the last tick, how long what is in flight may take to arrive

_time = time.time


class ScenarioError(SentientEdgeError):
    """A scenario that cannot run as given; the message says what to change."""


# Scenario


@dataclass(frozen=True)
class Scenario:
    url: str = "ws://127.0.0.1:4000/ws"
    drones: int = 10
    rate_hz: float = 10.0
    duration_s: float = 10.0
    payload_bytes: int = 0  # padding on top of the realistic telemetry fields (~300 bytes)
    stations: int = 1
    station_topics: tuple[str, ...] = ("drone/+/telemetry",)
    telemetry_qos: int = 0  # 1: every telemetry message is stored and acknowledged (puback)
    command_rate_hz: float = 0.0  # QoS 1 commands a second across the fleet, answered by drones
    churn: float = 0.0  # share of drones whose link drops and resumes during the run
    churn_period_s: float = 5.0  # a churning drone drops its link about this often
    encoding: str = "msgpack"
    workers: int = 1  # processes (Ray actors) or one thread without Ray
    drone_prefix: str = "sim"
    # Credentials: secrets to mint them, or the keys and token themselves.
    jwt_secret: str | None = None
    api_key_secret: str | None = None
    drone_keys: dict[str, str] | None = None
    station_token: str | None = None
    operator_token: str | None = None

    def drone_ids(self) -> list[str]:
        if self.drone_keys:
            return sorted(self.drone_keys)[: self.drones]
        return [f"{self.drone_prefix}-{i}" for i in range(self.drones)]

    def validate(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ScenarioError(message)

        need(
            self.url.startswith(("ws://", "wss://")),
            f"url must be ws:// or wss://, got {self.url!r}",
        )
        need(self.drones >= 1, f"drones must be at least 1, got {self.drones}")
        need(self.rate_hz > 0, f"rate_hz must be positive, got {self.rate_hz}")
        need(self.rate_hz <= 1000, f"rate_hz above 1000 is not a drone, got {self.rate_hz}")
        need(self.duration_s > 0, f"duration_s must be positive, got {self.duration_s}")
        need(self.payload_bytes >= 0, f"payload_bytes must be 0 or more, got {self.payload_bytes}")
        need(self.stations >= 0, f"stations must be 0 or more, got {self.stations}")
        need(
            self.command_rate_hz >= 0,
            f"command_rate_hz must be 0 or more, got {self.command_rate_hz}",
        )
        need(0 <= self.churn <= 1, f"churn is a share of the drones, 0 to 1, got {self.churn}")
        need(self.churn_period_s > 0, f"churn_period_s must be positive, got {self.churn_period_s}")
        need(
            self.encoding in ("json", "msgpack"),
            f"encoding is json or msgpack, got {self.encoding!r}",
        )
        need(self.telemetry_qos in (0, 1), f"telemetry_qos is 0 or 1, got {self.telemetry_qos}")
        need(1 <= self.workers <= self.drones, f"workers must be 1 to drones, got {self.workers}")
        for topic_filter in self.station_topics:
            try:
                validate_filter(topic_filter)
            except SentientEdgeError as exc:
                raise ScenarioError(f"station topic {topic_filter!r}: {exc}") from None
        need(
            bool(self.drone_keys) or bool(self.api_key_secret) or bool(self.jwt_secret),
            "drones need credentials: give api_key_secret (or jwt_secret) to mint them, "
            "or drone_keys",
        )
        if self.drone_keys is not None:
            need(len(self.drone_keys) >= self.drones, "drone_keys has fewer keys than drones")
        for role, token in (("station", self.station_token), ("operator", self.operator_token)):
            needed = self.stations if role == "station" else self.command_rate_hz
            need(
                not needed or bool(token) or bool(self.jwt_secret),
                f"{role}s need a token: give {role}_token, or jwt_secret to mint one",
            )

    def drone_credentials(self) -> dict[str, dict[str, str]]:
        """Connect arguments per drone: an API key, or a drone JWT."""
        out: dict[str, dict[str, str]] = {}
        for drone_id in self.drone_ids():
            if self.drone_keys:
                out[drone_id] = {"api_key": self.drone_keys[drone_id]}
            elif self.api_key_secret:
                out[drone_id] = {"api_key": auth.issue_api_key(self.api_key_secret, drone_id).key}
            else:
                assert self.jwt_secret is not None
                token = auth.mint_jwt(self.jwt_secret, drone_id, "drone", self.duration_s + 3600)
                out[drone_id] = {"token": token}
        return out

    def token_for(self, role: str) -> str:
        given = self.station_token if role == "observer" else self.operator_token
        if given:
            return given
        assert self.jwt_secret is not None
        return auth.mint_jwt(self.jwt_secret, f"loadgen-{role}", role, self.duration_s + 3600)


async def preflight(scenario: Scenario) -> None:
    """Fail at once, and clearly, when the router cannot be reached or refuses the credentials."""
    scenario.validate()
    first = scenario.drone_ids()[0]
    attempts: list[tuple[str, dict[str, Any]]] = [("drone", scenario.drone_credentials()[first])]
    if scenario.stations:
        attempts.append(("station", {"token": scenario.token_for("observer")}))
    if scenario.command_rate_hz:
        attempts.append(("operator", {"token": scenario.token_for("operator")}))
    for role, credentials in attempts:
        try:
            client = await Client.connect(scenario.url, open_timeout=5.0, **credentials)
        except ConnectRejected as exc:
            raise ScenarioError(
                f"the router refused the {role} credentials (HTTP {exc.status}): "
                f"{exc.body.get('reason', exc.body)}"
            ) from None
        except (OSError, asyncio.TimeoutError) as exc:
            reason = (
                exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            )
            raise ScenarioError(f"cannot reach {scenario.url}: {reason}") from None
        await client.close()


# Latency, mergeable across workers


@dataclass
class LatencyHistogram:
    """Counts in log-spaced buckets from 0.1 ms to 100 s, 2% apart: mergeable, bounded."""

    counts: dict[int, int] = field(default_factory=dict)
    total: int = 0
    max_s: float = 0.0

    _BASE = 1.02
    _FLOOR_S = 1e-4

    def add(self, seconds: float) -> None:
        seconds = max(seconds, self._FLOOR_S)
        self.add_to(_bucket_of(seconds), seconds)

    def add_to(self, bucket: int, seconds: float) -> None:
        """Count ``seconds``, already placed in ``bucket``: one logarithm for several histograms."""
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.total += 1
        if seconds > self.max_s:
            self.max_s = seconds

    def merge(self, other: LatencyHistogram) -> None:
        for bucket, count in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + count
        self.total += other.total
        self.max_s = max(self.max_s, other.max_s)

    def percentile(self, fraction: float) -> float:
        """Seconds; the upper edge of the bucket holding that share (within 2%)."""
        if not self.total:
            return 0.0
        rank = fraction * self.total
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return min(self._FLOOR_S * self._BASE ** (bucket + 1), self.max_s)
        return self.max_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": {str(k): v for k, v in self.counts.items()},
            "total": self.total,
            "max_s": self.max_s,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LatencyHistogram:
        return cls({int(k): v for k, v in raw["counts"].items()}, raw["total"], raw["max_s"])


_FLOOR_S = LatencyHistogram._FLOOR_S
_LOG_FLOOR = math.log(_FLOOR_S)
_PER_LOG_BASE = 1 / math.log(LatencyHistogram._BASE)


def _bucket_of(seconds: float) -> int:
    """The bucket of ``seconds`` (at least the floor): 0 from 0.1 ms, one more every 2%."""
    return int((math.log(seconds) - _LOG_FLOOR) * _PER_LOG_BASE)


# What a worker does


@dataclass
class WorkerTally:
    """Everything one worker counted; plain data, so it crosses a Ray call."""

    sent: dict[str, int] = field(default_factory=dict)  # drone -> telemetry sent
    sent_per_second: dict[int, int] = field(default_factory=dict)
    delivered: dict[str, dict[str, int]] = field(default_factory=dict)  # station -> drone -> n
    duplicates: int = 0
    delivered_per_second: dict[int, int] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    latency_per_second: dict[int, LatencyHistogram] = field(default_factory=dict)
    latency_per_drone: dict[str, LatencyHistogram] = field(default_factory=dict)
    commands_acked: int = 0
    commands_failed: int = 0
    commands_received: set[str] = field(default_factory=set)
    results_received: set[str] = field(default_factory=set)
    command_rtt: LatencyHistogram = field(default_factory=LatencyHistogram)
    puback: LatencyHistogram = field(default_factory=LatencyHistogram)
    acknowledged: int = 0
    reconnects: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # `error` frames the router sent, by code

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["latency"] = self.latency.to_dict()
        raw["latency_per_second"] = {k: v.to_dict() for k, v in self.latency_per_second.items()}
        raw["latency_per_drone"] = {k: v.to_dict() for k, v in self.latency_per_drone.items()}
        raw["command_rtt"] = self.command_rtt.to_dict()
        raw["puback"] = self.puback.to_dict()
        raw["commands_received"] = sorted(self.commands_received)
        raw["results_received"] = sorted(self.results_received)
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WorkerTally:
        tally = cls(**{k: v for k, v in raw.items() if k not in _HISTOGRAM_FIELDS})
        tally.latency = LatencyHistogram.from_dict(raw["latency"])
        tally.latency_per_second = {
            int(k): LatencyHistogram.from_dict(v) for k, v in raw["latency_per_second"].items()
        }
        tally.latency_per_drone = {
            k: LatencyHistogram.from_dict(v) for k, v in raw["latency_per_drone"].items()
        }
        tally.command_rtt = LatencyHistogram.from_dict(raw["command_rtt"])
        tally.puback = LatencyHistogram.from_dict(raw["puback"])
        tally.commands_received = set(raw["commands_received"])
        tally.results_received = set(raw["results_received"])
        return tally


_HISTOGRAM_FIELDS = {"latency", "latency_per_second", "latency_per_drone", "command_rtt", "puback"}


@dataclass(frozen=True)
class WorkerPlan:
    """One worker's share of a scenario."""

    scenario: Scenario
    drones: dict[str, dict[str, str]]  # drone id -> connect credentials
    stations: int  # stations this worker hosts (the first worker hosts them all)
    operator: bool
    started_at: float  # time.time() the drones start flying (all workers alike)


class Worker:
    """Drives a share of the fleet (and, on the first worker, the stations) on one event loop.

    Drones and stations are lean links (:mod:`sentientedge.loadgen_link`): one ticker sends
    for every drone, stations count inside the read callback; no task per drone. The
    operator, a few commands a second, is a full :class:`sentientedge.client.Client`.
    """

    def __init__(self, plan: WorkerPlan) -> None:
        self.plan = plan
        self.tally = WorkerTally()
        self.stop_event = asyncio.Event()
        self.connected = asyncio.Event()
        self._links: list[Link] = []
        self._stations: list[_Station] = []
        self._drones: list[_Drone] = []
        self._clients: list[Client] = []
        self._churn: dict[str, asyncio.TimerHandle] = {}
        self._commanding: asyncio.Task[None] | None = None
        s = plan.scenario
        # Telemetry topic -> drone, for the fleet's drones (all workers') the stations take.
        self.fleet_topics = {
            topic: drone
            for drone in s.drone_ids()
            if any(matches(f, topic := f"drone/{drone}/telemetry") for f in s.station_topics)
        }

    def second(self, at: float) -> int:
        return int(at - self.plan.started_at)

    async def run(self) -> WorkerTally:
        s = self.plan.scenario
        tasks: list[asyncio.Task[None]] = []
        ticker: Ticker | None = None
        try:
            self._stations = [_Station(self, f"station-{i}") for i in range(self.plan.stations)]
            for station in self._stations:
                await self._open(station)
                await station.subscribe(*s.station_topics)
            operator = await self._operator() if self.plan.operator else None
            gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

            async def connect(drone: _Drone) -> None:
                async with gate:
                    await self._open(drone)
                    if s.command_rate_hz:
                        await drone.subscribe(drone.command_topic)

            drones = [_Drone(self, d, credentials) for d, credentials in self.plan.drones.items()]
            await asyncio.gather(*(connect(drone) for drone in drones))
            self._drones = drones
            self.connected.set()
            share = round(s.churn * len(drones))
            churners = set(random.Random(7).sample(sorted(self.plan.drones), share))
            for drone in drones:
                if drone.drone_id in churners:
                    self._cut_later(drone)
            period = 1.0 / s.rate_hz
            end = self.plan.started_at + s.duration_s
            phases = [random.random() * period for _ in drones]  # spread over the period
            ticker = Ticker(TickSchedule(self.plan.started_at, period, end, phases), self._fire)
            ticker.start()
            if operator is not None:
                self._commanding = asyncio.create_task(self._command(operator))
                tasks.append(self._commanding)
                tasks.append(asyncio.create_task(self._collect_results(operator)))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), max(0.0, end - time.time()))
            self.stop_event.set()
            ticker.stop()
            await self._drain()
        finally:
            if ticker is not None:
                ticker.stop()
            for handle in self._churn.values():
                handle.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._count_up()
            await asyncio.gather(
                *(c.close() for c in self._clients),
                *(link.close() for link in self._links),
                return_exceptions=True,
            )
        return self.tally

    async def _open(self, link: Link) -> None:
        self._links.append(link)
        await link.open()

    async def _operator(self) -> Client:
        client = await Client.connect(
            self.plan.scenario.url,
            encoding=self.plan.scenario.encoding,
            reconnect=True,
            token=self.plan.scenario.token_for("operator"),
        )
        self._clients.append(client)
        await client.subscribe("drone/+/cmd/result")
        return client

    def _fire(self, seq: int, members: list[int]) -> None:
        """One tick: every due drone's telemetry goes out now, one after the other."""
        drones = self._drones
        sent = 0
        for index in members:
            drone = drones[index]
            if drone.is_open:  # a drone whose link is down skips its tick
                drone.send_telemetry(seq)
                sent += 1
        if sent:
            per_second = self.tally.sent_per_second
            second = int(_time() - self.plan.started_at)
            per_second[second] = per_second.get(second, 0) + sent

    def _cut_later(self, drone: _Drone) -> None:
        delay = random.uniform(0.5, 1.5) * self.plan.scenario.churn_period_s
        self._churn[drone.drone_id] = asyncio.get_running_loop().call_later(delay, self._cut, drone)

    def _cut(self, drone: _Drone) -> None:
        if self.stop_event.is_set():
            return
        drone.drop()  # the link drops; the drone reconnects and resumes its session
        self._cut_later(drone)

    async def _drain(self) -> None:
        """What is in flight arrives: until nothing is awaited any more, at most ``DRAIN_S``."""
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline and not self._settled():
            await asyncio.sleep(0.05)

    def _settled(self) -> bool:
        if self._commanding is not None and not self._commanding.done():
            return False  # a command in flight: counted once its puback is in
        if any(link.unacked for link in self._links):
            return False
        if self.tally.commands_acked > len(self.tally.results_received):
            return False
        if self.plan.stations and self.plan.scenario.workers > 1:
            return False  # other workers' drones: what they sent is not known here
        expected = sum(d.sent for d in self._drones if d.topic in self.fleet_topics)
        return all(station.delivered >= expected for station in self._stations)

    def _count_up(self) -> None:
        tally = self.tally
        tally.sent = {drone.drone_id: drone.sent for drone in self._drones}
        for station in self._stations:
            tally.delivered[station.name] = {
                heard.drone: heard.delivered for heard in station.heard.values() if heard.delivered
            }
        # Every delivery went into its second's histogram: the totals are their sums.
        tally.latency = LatencyHistogram()
        for second, histogram in tally.latency_per_second.items():
            tally.latency.merge(histogram)
            tally.delivered_per_second[second] = histogram.total
        tally.latency_per_drone = {d: h for d, h in tally.latency_per_drone.items() if h.total}
        tally.reconnects = sum(link.reconnects for link in self._links) + sum(
            c.reconnects for c in self._clients
        )
        for link in self._links:
            for code, count in link.errors.items():
                tally.errors[code] = tally.errors.get(code, 0) + count

    async def _command(self, operator: Client) -> None:
        s = self.plan.scenario
        targets = s.drone_ids()
        n = 0
        while not self.stop_event.is_set():
            drone = random.choice(targets)
            command_id = f"cmd-{self.plan.started_at:.0f}-{n}"
            try:
                await operator.publish(
                    f"drone/{drone}/cmd",
                    {"id": command_id, "sent": time.time()},
                    qos=1,
                    id=command_id,
                )
                self.tally.commands_acked += 1
            except ServerError:
                self.tally.commands_failed += 1
            n += 1
            with contextlib.suppress(asyncio.TimeoutError):  # (a stop ends the pause at once)
                await asyncio.wait_for(self.stop_event.wait(), 1.0 / s.command_rate_hz)

    async def _collect_results(self, operator: Client) -> None:
        while True:
            message = await operator.recv()
            data = message.data
            fresh = isinstance(data, dict) and data.get("id") not in self.tally.results_received
            if message.topic.endswith("/cmd/result") and fresh:
                self.tally.results_received.add(data["id"])
                self.tally.command_rtt.add(message.received_at - data["sent"])

    def snapshot(self) -> dict[str, Any]:
        now = self.second(time.time())
        recent = LatencyHistogram()
        for second in (now - 1, now - 2):
            histogram = self.tally.latency_per_second.get(second)
            if histogram is not None:
                # A copy first: with the thread backend, the loop thread adds as this reads.
                recent.merge(
                    LatencyHistogram(dict(histogram.counts), histogram.total, histogram.max_s)
                )
        return {
            "sent": sum(drone.sent for drone in self._drones),
            "delivered": sum(station.delivered for station in self._stations),
            "recent_latency": recent.to_dict(),
        }


class _Drone(Link):
    """A simulated drone: telemetry when the worker's ticker says, commands answered on arrival."""

    def __init__(self, worker: Worker, drone_id: str, credentials: dict[str, str]) -> None:
        s = worker.plan.scenario
        super().__init__(
            s.url,
            encoding=s.encoding,
            api_key=credentials.get("api_key"),
            token=credentials.get("token"),
        )
        self.tally = worker.tally
        self.drone_id = drone_id
        self.sent = 0
        self.topic = f"drone/{drone_id}/telemetry"
        self.command_topic = f"drone/{drone_id}/cmd"
        self._result_topic = f"drone/{drone_id}/cmd/result"
        self._pad = "x" * s.payload_bytes
        # QoS 1 ids: unique per drone and run (the router stores an id once for 10 minutes).
        self._id_prefix = f"t{round(worker.plan.started_at * 1000):x}-"
        self._qos1 = s.telemetry_qos == 1
        self._frame = (
            TelemetryFrame(self.mask, self._id_prefix if self._qos1 else None)
            if s.encoding == "msgpack"
            else None  # JSON: encoded whole, message by message
        )
        self._render_every = max(1, round(s.rate_hz))  # the flight fields move once a second
        self._render_at = 0

    def _data(self, seq: int, now: float) -> dict[str, Any]:
        data = telemetry(self.drone_id, seq, now)
        if self._pad:
            data["pad"] = self._pad
        return data

    def send_telemetry(self, seq: int) -> None:
        """Telemetry message ``seq``, stamped and written now: the ticker calls this when due."""
        frame = self._frame
        if frame is None or self._qos1 or seq >= self._render_at:
            self._send_telemetry(seq, _time())
        else:  # the common case, kept short: it runs for every message of a run
            self._write(frame.frame(seq, _time()))
        self.sent += 1

    def _send_telemetry(self, seq: int, now: float) -> None:
        frame = self._frame
        if frame is not None:
            if seq >= self._render_at:
                frame.render(self.topic, self._data(seq, now))
                self._render_at = seq + self._render_every
            wire = frame.frame(seq, now)
        else:
            pub: dict[str, Any] = {"op": "pub", "topic": self.topic, "data": self._data(seq, now)}
            if self._qos1:
                pub["qos"] = 1
                pub["id"] = f"{self._id_prefix}{seq:010d}"
            wire = client_frame(OP_TEXT, json.dumps(pub, separators=(",", ":")).encode(), self.mask)
        if self._qos1:
            self.track(f"{self._id_prefix}{seq:010d}", now, wire)
        else:
            self.write(wire)

    def on_puback(self, ident: str, sent: float, now: float) -> None:
        if ident.startswith(self._id_prefix):  # telemetry, not a command's result
            self.tally.puback.add(now - sent)
            self.tally.acknowledged += 1

    def on_message(self, frame: dict[str, Any], now: float) -> None:
        seq = frame.get("seq")
        if seq is not None and not self.take(seq):
            return  # a command redelivered after a resume, answered already
        data = frame.get("data")
        if frame["topic"] != self.command_topic or not isinstance(data, dict) or "id" not in data:
            return
        self.tally.commands_received.add(data["id"])
        result = {"id": data["id"], "sent": data.get("sent"), "ok": True}
        self.publish_durable(self._result_topic, result, f"res-{data['id']}", now)


class _Station(Link):
    """A ground station: counts each fleet telemetry message in the read callback, nothing more.

    This is the load generator's hottest path (every delivery of a run goes through it), so it
    keeps one record per drone (:class:`_Heard`), takes MessagePack frames with bytes keys
    (no UTF-8 decoding of every key), and fills only the per-second and per-drone latency
    histograms: the totals are sums of those (:meth:`Worker._count_up`).
    """

    def __init__(self, worker: Worker, name: str) -> None:
        s = worker.plan.scenario
        super().__init__(s.url, encoding=s.encoding, token=s.token_for("observer"))
        self.name = name
        self.tally = worker.tally
        self.started_at = worker.plan.started_at
        self.raw_messages = s.encoding == "msgpack"
        key: Callable[[str], Any] = str.encode if self.raw_messages else str
        self._seq, self._topic, self._retained, self._data, self._sent = map(
            key, ("seq", "topic", "retained", "data", "sent")
        )
        latency = worker.tally.latency_per_drone
        self.heard = {
            key(topic): _Heard(drone, latency.setdefault(drone, LatencyHistogram()))
            for topic, drone in worker.fleet_topics.items()
        }
        self._now = 0.0
        self._second: LatencyHistogram = LatencyHistogram()

    def on_message(self, frame: dict[Any, Any], now: float) -> None:
        seq = frame.get(self._seq)
        if seq is not None and not self.take(seq):
            return  # a QoS 1 delivery this session had already
        heard = self.heard.get(frame[self._topic])
        if heard is None or frame.get(self._retained):
            return  # not the fleet's telemetry, or a retained copy (not part of the live stream)
        data = frame[self._data]
        if type(data) is not dict:
            return
        number = data.get(self._seq, -1)
        # A drone's telemetry seqs increase: a seq at or below the last seen is a repeat
        # (the router keeps each drone's order, so no gap-filling is needed to tell).
        if number <= heard.last:
            self.tally.duplicates += 1
            return
        heard.last = number
        heard.delivered += 1
        latency = now - data[self._sent]
        bucket = _bucket_of(latency if latency > _FLOOR_S else _FLOOR_S)
        if now != self._now:  # a new read: its second's histogram (one lookup per read)
            self._now = now
            per_second = self.tally.latency_per_second
            second = int(now - self.started_at)
            if second not in per_second:
                per_second[second] = LatencyHistogram()
            self._second = per_second[second]
        for histogram in (self._second, heard.latency):
            counts = histogram.counts
            counts[bucket] = counts.get(bucket, 0) + 1
            histogram.total += 1
            if latency > histogram.max_s:
                histogram.max_s = latency

    @property
    def delivered(self) -> int:
        return sum(heard.delivered for heard in self.heard.values())


class _Heard:
    """What a station heard from one drone."""

    __slots__ = ("delivered", "drone", "last", "latency")

    def __init__(self, drone: str, latency: LatencyHistogram) -> None:
        self.drone = drone
        self.last = -1  # the last telemetry seq
        self.delivered = 0
        self.latency = latency  # the drone's, shared by the stations


# Results


@dataclass
class Results:
    scenario: Scenario
    tally: WorkerTally
    expected: int  # deliveries expected at the stations
    elapsed_s: float
    stopped_early: bool = False
    worker_nodes: list[str] = field(default_factory=list)  # where the workers ran

    @classmethod
    def combine(
        cls, scenario: Scenario, tallies: Iterable[WorkerTally], elapsed_s: float, stopped: bool
    ) -> Results:
        total = WorkerTally()
        for tally in tallies:
            for drone, count in tally.sent.items():
                total.sent[drone] = total.sent.get(drone, 0) + count
            _add(total.sent_per_second, tally.sent_per_second)
            for station, per_drone in tally.delivered.items():
                _add(total.delivered.setdefault(station, {}), per_drone)
            total.duplicates += tally.duplicates
            _add(total.delivered_per_second, tally.delivered_per_second)
            total.latency.merge(tally.latency)
            for second, histogram in tally.latency_per_second.items():
                total.latency_per_second.setdefault(second, LatencyHistogram()).merge(histogram)
            for drone, histogram in tally.latency_per_drone.items():
                total.latency_per_drone.setdefault(drone, LatencyHistogram()).merge(histogram)
            total.commands_acked += tally.commands_acked
            total.commands_failed += tally.commands_failed
            total.commands_received |= tally.commands_received
            total.results_received |= tally.results_received
            total.command_rtt.merge(tally.command_rtt)
            total.puback.merge(tally.puback)
            total.acknowledged += tally.acknowledged
            total.reconnects += tally.reconnects
            _add(total.errors, tally.errors)
        expected = 0
        for drone, sent in total.sent.items():
            topic = f"drone/{drone}/telemetry"
            if any(matches(f, topic) for f in scenario.station_topics):
                expected += sent * scenario.stations
        return cls(scenario, total, expected, elapsed_s, stopped)

    @property
    def offered(self) -> int:
        return sum(self.tally.sent.values())

    @property
    def delivered(self) -> int:
        return sum(sum(per_drone.values()) for per_drone in self.tally.delivered.values())

    @property
    def lost(self) -> int:
        return self.expected - self.delivered

    def latency_ms(self, histogram: LatencyHistogram | None = None) -> dict[str, float]:
        h = histogram or self.tally.latency
        return {
            name: round(h.percentile(q) * 1000, 2)
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))
        } | {"max": round(h.max_s * 1000, 2)}

    def summary(self) -> dict[str, Any]:
        duration = min(self.elapsed_s, self.scenario.duration_s) or 1.0
        out: dict[str, Any] = {
            "drones": self.scenario.drones,
            "rate_hz": self.scenario.rate_hz,
            "stations": self.scenario.stations,
            "duration_s": round(duration, 2),
            "offered": self.offered,
            "offered_per_s": round(self.offered / duration),
            "expected": self.expected,
            "delivered": self.delivered,
            "delivered_per_s": round(self.delivered / duration),
            "lost": self.lost,
            "loss": round(self.lost / self.expected, 6) if self.expected else 0.0,
            "duplicated": self.tally.duplicates,
            "latency_ms": self.latency_ms(),
            "reconnects": self.tally.reconnects,
            "stopped_early": self.stopped_early,
        }
        if self.tally.errors:  # rate_limited, queue_full, unavailable, ...: why it was lost
            out["errors"] = dict(self.tally.errors)
        if self.scenario.telemetry_qos:
            out["acknowledged"] = self.tally.acknowledged
            out["acknowledged_per_s"] = round(self.tally.acknowledged / duration)
            out["puback_ms"] = self.latency_ms(self.tally.puback)
        if self.scenario.command_rate_hz:
            out["commands"] = {
                "acked": self.tally.commands_acked,
                "failed": self.tally.commands_failed,
                "received_by_drones": len(self.tally.commands_received),
                "results": len(self.tally.results_received),
                "round_trip_ms": self.latency_ms(self.tally.command_rtt),
            }
        return out

    def per_drone(self) -> list[dict[str, Any]]:
        rows = []
        for drone in sorted(self.tally.sent):
            delivered = sum(per.get(drone, 0) for per in self.tally.delivered.values())
            histogram = self.tally.latency_per_drone.get(drone, LatencyHistogram())
            rows.append(
                {
                    "drone": drone,
                    "sent": self.tally.sent[drone],
                    "delivered": delivered,
                    "p99_ms": round(histogram.percentile(0.99) * 1000, 2),
                }
            )
        return rows

    def to_rows(self) -> list[dict[str, Any]]:
        """The per-second timeline: one row a second (a pandas DataFrame takes it as it is)."""
        seconds = sorted(set(self.tally.sent_per_second) | set(self.tally.delivered_per_second))
        return [
            {
                "second": second,
                "sent": self.tally.sent_per_second.get(second, 0),
                "delivered": self.tally.delivered_per_second.get(second, 0),
                "p99_ms": round(
                    self.tally.latency_per_second.get(second, LatencyHistogram()).percentile(0.99)
                    * 1000,
                    2,
                ),
            }
            for second in seconds
            if second >= 0
        ]

    def to_json(self) -> str:
        return json.dumps(
            {"summary": self.summary(), "timeline": self.to_rows(), "drones": self.per_drone()}
        )

    def plot(self) -> Any:
        """Throughput over time and the latency distribution (matplotlib: the ``plot`` extra)."""
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            raise ScenarioError(
                "plot() needs matplotlib: pip install 'sentientedge[plot]'"
            ) from None
        rows = self.to_rows()
        figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4))
        seconds = [r["second"] for r in rows]
        throughput.plot(seconds, [r["sent"] for r in rows], label="sent")
        throughput.plot(seconds, [r["delivered"] for r in rows], label="delivered")
        throughput.set_xlabel("second")
        throughput.set_ylabel("messages / s")
        throughput.set_title("Throughput")
        throughput.legend()
        histogram = self.tally.latency
        buckets = sorted(histogram.counts)
        edges = [
            LatencyHistogram._FLOOR_S * LatencyHistogram._BASE ** (b + 1) * 1000 for b in buckets
        ]
        cumulative, seen = [], 0
        for bucket in buckets:
            seen += histogram.counts[bucket]
            cumulative.append(seen / max(histogram.total, 1))
        latency.plot(edges, cumulative)
        latency.set_xscale("log")
        latency.set_xlabel("latency, ms")
        latency.set_ylabel("share of messages")
        latency.set_title(f"Latency (p99 {self.latency_ms()['p99']} ms)")
        figure.tight_layout()
        return figure


def _add(into: dict[Any, int], other: dict[Any, int]) -> None:
    for key, value in other.items():
        into[key] = into.get(key, 0) + value


# Running


def plan(scenario: Scenario) -> list[WorkerPlan]:
    """Split a scenario over its workers; the first hosts the stations and the operator."""
    credentials = scenario.drone_credentials()
    ids = sorted(credentials)
    # Everyone connected by then (connects run CONNECT_CONCURRENCY at a time, a few ms each).
    started_at = time.time() + 3.0 + scenario.drones / 500
    shares = [ids[i :: scenario.workers] for i in range(scenario.workers)]
    return [
        WorkerPlan(
            scenario=scenario,
            drones={d: credentials[d] for d in share},
            stations=scenario.stations if index == 0 else 0,
            operator=index == 0 and scenario.command_rate_hz > 0,
            started_at=started_at,
        )
        for index, share in enumerate(shares)
    ]


class LoadRun:
    """A run in progress: ``progress()`` while it goes, ``stop()`` to end it early, ``wait()``."""

    def __init__(
        self, scenario: Scenario, *, on_ray: bool = False, ray_address: str = "auto"
    ) -> None:
        if _loop_running():  # inside Jupyter: an event loop already runs in this thread
            _in_thread(preflight(scenario))
        else:
            asyncio.run(preflight(scenario))
        self.scenario = scenario
        self.started = time.time()
        self.plans = plan(scenario)
        self.stopped_early = False
        if on_ray:
            # The Ray side lives with the actors; imported only when asked for.
            from actors.load_fleet import RayLoadBackend

            self._backend: LoadBackend = RayLoadBackend(self.plans, ray_address)
        else:
            self._backend = _ThreadBackend(self.plans)

    def progress(self) -> dict[str, Any]:
        snapshots = self._backend.snapshots()
        recent = LatencyHistogram()
        for snap in snapshots:
            recent.merge(LatencyHistogram.from_dict(snap["recent_latency"]))
        return {
            "sent": sum(s["sent"] for s in snapshots),
            "delivered": sum(s["delivered"] for s in snapshots),
            "p99_ms": round(recent.percentile(0.99) * 1000, 1),
            "elapsed_s": time.time() - self.plans[0].started_at,
        }

    def stop(self) -> None:
        self.stopped_early = True
        self._backend.stop()

    def wait(self, progress: bool = True) -> Results:
        bar = _progress_bar(self.scenario) if progress else None
        last_sent, last_time = 0, time.time()
        try:
            while not self._backend.done():
                time.sleep(PROGRESS_INTERVAL_S)
                if bar is not None:
                    now = self.progress()
                    rate = (now["sent"] - last_sent) / max(time.time() - last_time, 1e-6)
                    last_sent, last_time = now["sent"], time.time()
                    bar.n = min(max(now["elapsed_s"], 0.0), self.scenario.duration_s)
                    bar.set_postfix(msgs_s=round(rate), p99_ms=now["p99_ms"])
        except KeyboardInterrupt:  # the notebook's stop button
            self.stop()
            while not self._backend.done():
                time.sleep(0.2)
        finally:
            if bar is not None:
                bar.close()
        tallies = self._backend.results()
        results = Results.combine(
            self.scenario, tallies, time.time() - self.plans[0].started_at, self.stopped_early
        )
        results.worker_nodes = self._backend.nodes
        return results


def run(
    scenario: Scenario, *, on_ray: bool = False, ray_address: str = "auto", progress: bool = True
) -> Results:
    """Run a scenario to the end (or until interrupted) and return its results.

    ``on_ray``: the workers run as Ray actors spread over the cluster at ``ray_address``
    (joined if this process has not joined one yet).
    """
    return LoadRun(scenario, on_ray=on_ray, ray_address=ray_address).wait(progress=progress)


def _progress_bar(scenario: Scenario) -> Any:
    try:
        from tqdm.auto import tqdm  # the notebook widget inside Jupyter, text elsewhere
    except ImportError:
        return None
    return tqdm(
        total=scenario.duration_s,
        unit="s",
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s{postfix}",
    )


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _in_thread(coroutine: Any) -> Any:
    """Run a coroutine to completion from code that already runs in an event loop (Jupyter)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coroutine)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (a project dependency): less CPU per read and write."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoadBackend:
    """Where a run's workers execute: a thread here, or Ray actors (actors.load_fleet)."""

    nodes: list[str] = []

    def snapshots(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def done(self) -> bool:
        raise NotImplementedError

    def results(self) -> list[WorkerTally]:
        raise NotImplementedError


class _ThreadBackend(LoadBackend):
    """Every worker on one event loop in a background thread of this process."""

    def __init__(self, plans: list[WorkerPlan]) -> None:
        self.nodes = ["this process"] * len(plans)
        self._loop = _new_event_loop()
        self._workers: list[Worker] = []
        self._future: Any = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait()
        self._future = asyncio.run_coroutine_threadsafe(self._run_all(plans), self._loop)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._ready.set()
        self._loop.run_forever()

    async def _run_all(self, plans: list[WorkerPlan]) -> list[WorkerTally]:
        self._workers = [Worker(p) for p in plans]
        return list(await asyncio.gather(*(w.run() for w in self._workers)))

    def snapshots(self) -> list[dict[str, Any]]:
        return [w.snapshot() for w in list(self._workers)]

    def stop(self) -> None:
        for worker in self._workers:
            self._loop.call_soon_threadsafe(worker.stop_event.set)

    def done(self) -> bool:
        return bool(self._future.done())

    def results(self) -> list[WorkerTally]:
        tallies: list[WorkerTally] = self._future.result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        return tallies


__all__ = [
    "LatencyHistogram",
    "LoadRun",
    "Results",
    "Scenario",
    "ScenarioError",
    "preflight",
    "run",
]
