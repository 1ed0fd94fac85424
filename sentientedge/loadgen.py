"""Load generation for researchers: simulated fleets against a router, from a notebook.

    from sentientedge.loadgen import Scenario, run

    scenario = Scenario(url="ws://127.0.0.1:4000/ws", drones=200, rate_hz=50, duration_s=30,
                        stations=2, churn=0.05, jwt_secret=..., api_key_secret=...)
    results = run(scenario)                   # a live progress bar; Ctrl-C / interrupt stops early
    results.summary()                         # totals and latency percentiles
    results.to_rows()                         # the per-second timeline, for pandas
    results.plot()                            # throughput over time, latency distribution

The load runs in workers, each driving many simulated drones on one event loop: in a thread of
this process (``run(scenario)``), or as Ray actors spread over the cluster's nodes
(``run(scenario, on_ray=True)``, more workers give more load). Stations subscribe and measure;
an operator sends QoS 1 commands that drones answer on ``drone/{id}/cmd/result``; churning
drones cut their connection now and then and resume their session.

Rules for this module:
- A scenario is checked before anything starts: bad values, an unreachable router and refused
  credentials fail at once with :class:`ScenarioError` and a message saying what to fix.
- Counting is exact: at the stations, every telemetry message a drone sent is either delivered
  (once) or lost; duplicates are counted apart. Latency is receive time minus send time
  (``time.time()``: across machines it assumes synchronised clocks).
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
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from sentientedge import auth
from sentientedge.client import Client
from sentientedge.errors import ConnectRejected, SentientEdgeError, ServerError
from sentientedge.fleet import telemetry
from sentientedge.topics import matches, validate_filter

PROGRESS_INTERVAL_S = 0.5
CONNECT_CONCURRENCY = 200


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
        bucket = int(math.log(seconds / self._FLOOR_S, self._BASE))
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
    """Drives a share of the fleet (and, on the first worker, the stations) on one event loop."""

    def __init__(self, plan: WorkerPlan) -> None:
        self.plan = plan
        self.tally = WorkerTally()
        self.stop_event = asyncio.Event()
        self.connected = asyncio.Event()
        self._clients: list[Client] = []

    def second(self, at: float) -> int:
        return int(at - self.plan.started_at)

    async def run(self) -> WorkerTally:
        s = self.plan.scenario
        tasks = []
        try:
            stations = [await self._station(i) for i in range(self.plan.stations)]
            operator = await self._operator() if self.plan.operator else None
            gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

            async def connect(drone_id: str, credentials: dict[str, str]) -> Client:
                async with gate:
                    return await self._drone(drone_id, credentials)

            connected = await asyncio.gather(
                *(connect(d, creds) for d, creds in self.plan.drones.items())
            )
            drones = dict(zip(self.plan.drones, connected, strict=True))
            self.connected.set()
            for client, name in stations:
                tasks.append(asyncio.create_task(self._listen(client, name)))
            churners = set(random.Random(7).sample(sorted(drones), round(s.churn * len(drones))))
            for drone_id, client in drones.items():
                tasks.append(asyncio.create_task(self._fly(drone_id, client)))
                tasks.append(asyncio.create_task(self._answer_commands(drone_id, client)))
                if drone_id in churners:
                    tasks.append(asyncio.create_task(self._churn(client)))
            if operator is not None:
                tasks.append(asyncio.create_task(self._command(operator)))
                tasks.append(asyncio.create_task(self._collect_results(operator)))
            end = self.plan.started_at + s.duration_s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), max(0.0, end - time.time()))
            self.stop_event.set()
            await asyncio.sleep(2.0)  # what is in flight arrives
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.tally.reconnects = sum(c.reconnects for c in self._clients)
            await asyncio.gather(*(c.close() for c in self._clients), return_exceptions=True)
        return self.tally

    async def _connect(self, **kwargs: Any) -> Client:
        client = await Client.connect(
            self.plan.scenario.url, encoding=self.plan.scenario.encoding, reconnect=True, **kwargs
        )
        self._clients.append(client)
        return client

    async def _station(self, index: int) -> tuple[Client, str]:
        client = await self._connect(token=self.plan.scenario.token_for("observer"))
        await client.subscribe(*self.plan.scenario.station_topics)
        return client, f"station-{index}"

    async def _operator(self) -> Client:
        client = await self._connect(token=self.plan.scenario.token_for("operator"))
        await client.subscribe("drone/+/cmd/result")
        return client

    async def _drone(self, drone_id: str, credentials: dict[str, str]) -> Client:
        client = await self._connect(**credentials)
        if self.plan.scenario.command_rate_hz:
            await client.subscribe(f"drone/{drone_id}/cmd")
        return client

    async def _fly(self, drone_id: str, client: Client) -> None:
        s = self.plan.scenario
        topic = f"drone/{drone_id}/telemetry"
        period = 1.0 / s.rate_hz
        pad = "x" * s.payload_bytes
        start = self.plan.started_at + random.random() * period
        seq = 0
        sent = self.tally.sent
        per_second = self.tally.sent_per_second
        pending: set[asyncio.Task[None]] = set()
        while not self.stop_event.is_set():
            due = start + seq * period
            if due >= self.plan.started_at + s.duration_s:
                break
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            data = telemetry(drone_id, seq, time.time())
            if pad:
                data["pad"] = pad
            if not client.closed:
                if s.telemetry_qos:  # don't wait for each puback before the next tick
                    task = asyncio.create_task(self._publish_durable(client, topic, data))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                else:
                    await client.publish(topic, data)
                sent[drone_id] = sent.get(drone_id, 0) + 1
                second = self.second(time.time())
                per_second[second] = per_second.get(second, 0) + 1
            seq += 1
        await asyncio.gather(*pending, return_exceptions=True)

    async def _publish_durable(self, client: Client, topic: str, data: dict[str, Any]) -> None:
        started = time.perf_counter()
        await client.publish(topic, data, qos=1, timeout=60)
        self.tally.puback.add(time.perf_counter() - started)
        self.tally.acknowledged += 1

    async def _churn(self, client: Client) -> None:
        period = self.plan.scenario.churn_period_s
        while not self.stop_event.is_set():
            await asyncio.sleep(random.uniform(0.5, 1.5) * period)
            with contextlib.suppress(Exception):
                client.transport.abort()  # the link drops; the client reconnects and resumes

    async def _listen(self, client: Client, station: str) -> None:
        tally = self.tally
        seen: dict[str, int] = {}
        delivered = tally.delivered.setdefault(station, {})
        filters = self.plan.scenario.station_topics
        fleet = set(self.plan.scenario.drone_ids())  # not other traffic on the same router
        while True:
            message = await client.recv()
            if message.retained or not message.topic.endswith("/telemetry"):
                continue
            if not any(matches(f, message.topic) for f in filters):
                continue
            drone = message.topic.split("/")[1]
            if drone not in fleet:
                continue
            data = message.data
            seq = data.get("seq", -1) if isinstance(data, dict) else -1
            key = f"{drone}"
            # A drone's telemetry seqs increase: a seq at or below the last seen is a repeat
            # (the client keeps order, so no gap-filling is needed to tell).
            if seq <= seen.get(key, -1):
                tally.duplicates += 1
                continue
            seen[key] = seq
            delivered[drone] = delivered.get(drone, 0) + 1
            latency = message.received_at - data["sent"]
            tally.latency.add(latency)
            tally.latency_per_drone.setdefault(drone, LatencyHistogram()).add(latency)
            second = self.second(message.received_at)
            tally.delivered_per_second[second] = tally.delivered_per_second.get(second, 0) + 1
            tally.latency_per_second.setdefault(second, LatencyHistogram()).add(latency)

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
            await asyncio.sleep(1.0 / s.command_rate_hz)

    async def _answer_commands(self, drone_id: str, client: Client) -> None:
        if not self.plan.scenario.command_rate_hz:
            return
        while True:
            message = await client.recv()
            if message.topic != f"drone/{drone_id}/cmd" or not isinstance(message.data, dict):
                continue
            self.tally.commands_received.add(message.data["id"])
            result = {"id": message.data["id"], "sent": message.data["sent"], "ok": True}
            await client.publish(f"drone/{drone_id}/cmd/result", result, qos=1)

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
            if second in self.tally.latency_per_second:
                recent.merge(self.tally.latency_per_second[second])
        return {
            "sent": sum(self.tally.sent.values()),
            "delivered": sum(sum(d.values()) for d in self.tally.delivered.values()),
            "recent_latency": recent.to_dict(),
        }


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
        self._loop = asyncio.new_event_loop()
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
