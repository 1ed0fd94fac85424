"""Prometheus metrics of every router process, read from plain counters at scrape time.

Rules for this module:
- The hot path only bumps integers (and, for one message in ``RESPONSE_SAMPLE_EVERY``, a
  histogram bucket); collectors turn them into metric families when scraped.
- The design's names (``websocket_connections_total``, ``websocket_messages_per_second``,
  ``websocket_response_time_seconds``, ``redis_cluster_health``, ``server_cpu_usage_percent``,
  ``server_memory_usage_percent``, ``failover_events_total``, ``scaling_events_total``) and the
  router's own under ``sentientedge_``. Every series has ``node`` and ``actor`` labels: each
  comes from exactly one process. Cluster-wide counts (failovers, scaling) come from the
  controller alone, so summing never counts one twice.
- Labels are of low cardinality (node, actor, outcome, reason), never a drone id or a topic.
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# Router receive to socket write, seconds: sub-millisecond to the design's 1 s alert and past it.
RESPONSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RESPONSE_SAMPLE_EVERY = 16  # one delivered message in 16 is timed: the rest cost nothing
RATE_WINDOW_S = 10.0  # websocket_messages_per_second is the mean over the last 10 s


@dataclass(frozen=True)
class ProcessLabels:
    node: str  # the node's IP address
    actor: str  # the Ray actor's name (ingress-0, shard-1, controller)

    def values(self, *more: str) -> list[str]:
        return [self.node, self.actor, *more]


LABELS = ["node", "actor"]


class Histogram:
    """Cumulative-bucket histogram of plain numbers (no locks, no label lookups)."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = RESPONSE_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def buckets(self) -> list[tuple[str, int]]:
        """Prometheus's cumulative buckets, ``+Inf`` last."""
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((_le(bound), running))
        out.append(("+Inf", self.count))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))


class RateWindow:
    """Messages a second over the last ``RATE_WINDOW_S``, from counters sampled each second."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self._samples: deque[tuple[float, int, int]] = deque()
        self._window_s = window_s

    def sample(self, now: float, received: int, sent: int) -> None:
        samples = self._samples
        samples.append((now, received, sent))
        while len(samples) > 2 and now - samples[1][0] >= self._window_s:
            samples.popleft()

    def rates(self) -> tuple[float, float]:
        """(in, out) messages a second; 0 until two samples exist."""
        if len(self._samples) < 2:
            return 0.0, 0.0
        (t0, in0, out0), (t1, in1, out1) = self._samples[0], self._samples[-1]
        span = t1 - t0
        if span <= 0:
            return 0.0, 0.0
        return (in1 - in0) / span, (out1 - out0) / span


@dataclass
class IngressCounters:
    received: Counter[str] = field(default_factory=Counter)  # by outcome
    delivered: int = 0
    redelivered: int = 0  # QoS 1 messages sent again with dup: true
    acks: int = 0  # QoS 1 acks from clients
    dropped: Counter[str] = field(default_factory=Counter)  # by reason
    handshakes: Counter[int] = field(default_factory=Counter)  # by HTTP status
    closes: Counter[int] = field(default_factory=Counter)  # by close code sent
    response_time: Histogram = field(default_factory=Histogram)
    rates: RateWindow = field(default_factory=RateWindow)


@dataclass(frozen=True)
class HostLoad:
    cpu_percent: float
    memory_percent: float


def host_load() -> HostLoad:
    """The machine's CPU and memory use (psutil comes with Ray)."""
    import psutil

    return HostLoad(psutil.cpu_percent(interval=None), psutil.virtual_memory().percent)


class IngressCollector(Collector):
    def __init__(
        self,
        labels: ProcessLabels,
        counters: IngressCounters,
        connections: Callable[[], int],
        backlog: Callable[[], int] = lambda: 0,
        redis_ok: Callable[[], bool] = lambda: True,
        host: Callable[[], HostLoad] = host_load,
    ) -> None:
        self._labels = labels
        self._counters = counters
        self._connections = connections
        self._backlog = backlog
        self._redis_ok = redis_ok
        self._host = host

    def collect(self) -> Iterator[Metric]:
        labels, c = self._labels, self._counters
        yield _gauge(
            "websocket_connections_total", "Open WebSocket connections", labels, self._connections()
        )
        rates = GaugeMetricFamily(
            "websocket_messages_per_second",
            f"Client messages a second over the last {RATE_WINDOW_S:.0f} s, by direction",
            labels=[*LABELS, "direction"],
        )
        received, sent = c.rates.rates()
        rates.add_metric(labels.values("in"), received)
        rates.add_metric(labels.values("out"), sent)
        yield rates
        histogram = HistogramMetricFamily(
            "websocket_response_time_seconds",
            "Router receive to socket write of delivered messages "
            f"(one in {RESPONSE_SAMPLE_EVERY} timed)",
            labels=LABELS,
        )
        histogram.add_metric(labels.values(), c.response_time.buckets(), c.response_time.total)
        yield histogram
        yield _gauge(
            "redis_cluster_health",
            "1 when Redis answers, 0 when not",
            labels,
            int(self._redis_ok()),
        )
        host = self._host()
        yield _gauge("server_cpu_usage_percent", "CPU use of the node", labels, host.cpu_percent)
        yield _gauge(
            "server_memory_usage_percent", "Memory use of the node", labels, host.memory_percent
        )
        yield _counter_by(
            "sentientedge_messages_received",
            "Client frames received, by outcome",
            labels,
            "outcome",
            c.received,
        )
        yield _counter("sentientedge_messages_delivered", "Messages sent", labels, c.delivered)
        yield _counter(
            "sentientedge_qos1_redelivered",
            "QoS 1 messages sent again (dup: true)",
            labels,
            c.redelivered,
        )
        yield _counter("sentientedge_qos1_acks", "QoS 1 acks from clients", labels, c.acks)
        yield _counter_by(
            "sentientedge_messages_dropped",
            "Messages dropped, by reason",
            labels,
            "reason",
            c.dropped,
        )
        yield _counter(
            "sentientedge_rate_limited",
            "Client frames dropped by a rate limit",
            labels,
            c.received.get("rate_limited", 0),
        )
        yield _counter_by(
            "sentientedge_handshakes",
            "Handshakes and HTTP requests answered, by status",
            labels,
            "status",
            c.handshakes,
        )
        yield _counter_by(
            "sentientedge_closes",
            "Connections closed by the server, by close code",
            labels,
            "code",
            c.closes,
        )
        yield _gauge(
            "sentientedge_stream_backlog",
            "Items waiting to leave for the shards (the streams' backlog)",
            labels,
            self._backlog(),
        )


class StatsCollector(Collector):
    """Metrics of a process that keeps its numbers in a stats map (a shard, the controller)."""

    def __init__(
        self,
        labels: ProcessLabels,
        stats: Callable[[], Mapping[str, Any]],
        counters: Mapping[str, tuple[str, str]],
        gauges: Mapping[str, tuple[str, str]],
        labelled_counters: Mapping[str, tuple[str, str, str]] | None = None,
    ) -> None:
        self._labels = labels
        self._stats = stats
        self._counters = counters
        self._gauges = gauges
        self._labelled = labelled_counters or {}

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        labels = self._labels
        for key, (name, documentation) in self._counters.items():
            yield _counter(name, documentation, labels, stats.get(key, 0))
        for key, (name, documentation) in self._gauges.items():
            yield _gauge(name, documentation, labels, stats.get(key, 0))
        for key, (name, documentation, label) in self._labelled.items():
            yield _counter_by(name, documentation, labels, label, stats.get(key) or {})


SHARD_COUNTERS = {
    "routed": ("sentientedge_shard_routed", "QoS 0 messages routed by the shard"),
    "delivered": ("sentientedge_shard_delivered", "Deliveries handed to ingresses"),
    "stored": ("sentientedge_qos1_stored", "QoS 1 messages stored (puback sent)"),
    "duplicates": ("sentientedge_qos1_duplicates", "QoS 1 messages with an id already stored"),
    "retained_refused": (
        "sentientedge_retained_refused",
        "Retained publications past MAX_RETAINED_PER_DRONE",
    ),
    "away_sessions_dropped": (
        "sentientedge_away_sessions_dropped",
        "An identity's oldest away sessions no longer routed (past its bound)",
    ),
    "store_failures": ("sentientedge_store_failures", "QoS 1 batches Redis could not take"),
    "archive_written": ("sentientedge_archive_rows_written", "Rows written to the archive"),
    "archive_dropped": (
        "sentientedge_archive_rows_dropped",
        "QoS 0 rows dropped while the archive could not keep up (ARCHIVE_BUFFER_MAX)",
    ),
    "archive_failures": ("sentientedge_archive_failures", "Archive writes that failed"),
    "cpu_s": ("sentientedge_process_cpu_seconds", "CPU time of the process"),
}
SHARD_GAUGES = {
    "sessions": ("sentientedge_sessions", "Sessions hosted by the shard"),
    "principals": ("sentientedge_principals", "Drones and users with a connection"),
    "retained": ("sentientedge_retained_topics", "Topics with a retained message"),
    "drones_online": ("sentientedge_drones_online", "Drones with a connection"),
    "store_backlog": ("sentientedge_store_backlog", "QoS 1 messages waiting to be stored"),
    "archive_buffered": ("sentientedge_archive_backlog", "Rows waiting for the archive"),
    "archive_pool_usage": (
        "database_connection_pool_usage",
        "Share of DB_POOL_SIZE connections in use by the archive",
    ),
    "rss_bytes": ("sentientedge_process_resident_memory_bytes", "Resident memory"),
}
CONTROLLER_COUNTERS: dict[str, tuple[str, str]] = {
    "cpu_s": ("sentientedge_process_cpu_seconds", "CPU time of the process"),
}
CONTROLLER_GAUGES = {
    "instances": ("sentientedge_instances", "Instances (one shard each, and their ingresses)"),
    "ingresses": ("sentientedge_ingresses", "Ingress actors (at least one a serving node)"),
}
CONTROLLER_LABELLED = {
    "failover_events_total": (
        "failover_events",
        "Router parts that died and served again, by kind (shard, ingress, node, redis)",
        "kind",
    ),
    "scaling_events": (
        "scaling_events",
        "Scaling steps carried out, by direction (up, down)",
        "direction",
    ),
}


def _gauge(name: str, documentation: str, labels: ProcessLabels, value: float) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=LABELS)
    family.add_metric(labels.values(), value)
    return family


def _counter(name: str, documentation: str, labels: ProcessLabels, value: float) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=LABELS)
    family.add_metric(labels.values(), value)
    return family


def _counter_by(
    name: str, documentation: str, labels: ProcessLabels, label: str, counts: Mapping[Any, int]
) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=[*LABELS, label])
    for value, count in counts.items():
        family.add_metric(labels.values(str(value)), count)
    return family


def make_registry(*collectors: Collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def merge_expositions(texts: list[str]) -> bytes:
    """Several processes' expositions as one: each family once, with every process's samples
    (they differ by ``node`` and ``actor``)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            known = families.get(family.name)
            if known is None:
                families[family.name] = family
            elif known.type == family.type:
                known.samples.extend(family.samples)
    return render(make_registry(_Fixed(list(families.values()))))


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
