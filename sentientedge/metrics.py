"""Prometheus metrics of an ingress, read from plain counters at scrape time.

The hot path only bumps integers on :class:`IngressCounters`; a custom collector turns them into
metric families when ``/metrics`` is scraped, so counting costs nothing measurable per message.
Labels are of low cardinality (ingress, outcome, reason), never a drone id or a topic.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass
class IngressCounters:
    received: Counter[str] = field(default_factory=Counter)  # by outcome
    delivered: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # by reason
    handshakes: Counter[int] = field(default_factory=Counter)  # by HTTP status
    closes: Counter[int] = field(default_factory=Counter)  # by close code sent


class IngressCollector(Collector):
    def __init__(
        self, ingress: str, counters: IngressCounters, connections: Callable[[], int]
    ) -> None:
        self._ingress = ingress
        self._counters = counters
        self._connections = connections

    def collect(self) -> Iterator[Metric]:
        ingress = self._ingress
        c = self._counters
        gauge = GaugeMetricFamily(
            "sentientedge_connections", "Open WebSocket connections", labels=["ingress"]
        )
        gauge.add_metric([ingress], self._connections())
        yield gauge
        received = CounterMetricFamily(
            "sentientedge_messages_received",
            "Client frames received, by outcome",
            labels=["ingress", "outcome"],
        )
        for outcome, count in c.received.items():
            received.add_metric([ingress, outcome], count)
        yield received
        delivered = CounterMetricFamily(
            "sentientedge_messages_delivered", "Messages sent to subscribers", labels=["ingress"]
        )
        delivered.add_metric([ingress], c.delivered)
        yield delivered
        dropped = CounterMetricFamily(
            "sentientedge_messages_dropped",
            "Messages dropped, by reason",
            labels=["ingress", "reason"],
        )
        for reason, count in c.dropped.items():
            dropped.add_metric([ingress, reason], count)
        yield dropped
        handshakes = CounterMetricFamily(
            "sentientedge_handshakes",
            "WebSocket handshakes, by HTTP status",
            labels=["ingress", "status"],
        )
        for status, count in c.handshakes.items():
            handshakes.add_metric([ingress, str(status)], count)
        yield handshakes
        closes = CounterMetricFamily(
            "sentientedge_closes",
            "Connections closed by the server, by close code",
            labels=["ingress", "code"],
        )
        for code, count in c.closes.items():
            closes.add_metric([ingress, str(code)], count)
        yield closes


def make_registry(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
