"""Prometheus metrics of an ingress, read from plain counters at scrape time.

The hot path only bumps integers on :class:`IngressCounters`; a custom collector turns them into
metric families when ``/metrics`` is scraped, so counting costs nothing measurable per message.
Labels are of low cardinality (ingress, outcome, reason), never a drone id or a topic.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

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
    failover_events: dict[str, int] = field(default_factory=dict)  # cluster-wide, by kind
    scaling_events: dict[str, int] = field(default_factory=dict)  # cluster-wide, by direction


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
        yield _by_label(
            "sentientedge_messages_received",
            "Client frames received, by outcome",
            ingress,
            "outcome",
            c.received,
        )
        yield _by_label(
            "sentientedge_messages_delivered",
            "Messages sent to subscribers",
            ingress,
            None,
            {None: c.delivered},
        )
        yield _by_label(
            "sentientedge_messages_dropped",
            "Messages dropped, by reason",
            ingress,
            "reason",
            c.dropped,
        )
        yield _by_label(
            "sentientedge_handshakes",
            "WebSocket handshakes, by HTTP status",
            ingress,
            "status",
            c.handshakes,
        )
        yield _cluster_wide(
            "sentientedge_failover_events",
            "Router parts that died and served again, cluster-wide, by kind",
            "kind",
            c.failover_events,
        )
        yield _cluster_wide(
            "scaling_events",
            "Scaling decisions carried out, cluster-wide, by direction (up, down)",
            "direction",
            c.scaling_events,
        )
        yield _by_label(
            "sentientedge_closes",
            "Connections closed by the server, by close code",
            ingress,
            "code",
            c.closes,
        )


def _by_label(
    name: str, documentation: str, ingress: str, label: str | None, counts: Mapping[Any, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(
        name, documentation, labels=["ingress"] if label is None else ["ingress", label]
    )
    for value, count in counts.items():
        family.add_metric([ingress] if label is None else [ingress, str(value)], count)
    return family


def _cluster_wide(
    name: str, documentation: str, label: str, counts: Mapping[str, int]
) -> CounterMetricFamily:
    """A count the controller keeps for the whole cluster (no ``ingress`` label)."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family


def make_registry(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
