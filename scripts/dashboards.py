"""Write the Grafana dashboards under deploy/grafana/ from the panel lists below.

    .venv/bin/python scripts/dashboards.py      # rewrites deploy/grafana/*.json

Every query names only metrics the router exports (tests/e2e/test_observability.py evaluates
each against a Prometheus scraping a router). Each dashboard has a ``datasource`` variable, so it
imports into any Grafana with a Prometheus data source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "deploy" / "grafana"

# title -> (uid, [(panel title, unit, [(query, legend)])])
DASHBOARDS: dict[str, tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = {
    "SentientEdge: connections": (
        "se-connections",
        [
            (
                "Open WebSocket connections by node",
                "short",
                [("sum by (node) (websocket_connections_total)", "{{node}}")],
            ),
            (
                "Connections by ingress",
                "short",
                [("websocket_connections_total", "{{actor}}")],
            ),
            (
                "Handshakes by HTTP status (per second)",
                "reqps",
                [("sum by (status) (rate(sentientedge_handshakes_total[1m]))", "{{status}}")],
            ),
            (
                "Connections closed by the server, by close code (per second)",
                "ops",
                [("sum by (code) (rate(sentientedge_closes_total[1m]))", "{{code}}")],
            ),
            (
                "Drones online",
                "short",
                [("sum(sentientedge_drones_online)", "drones")],
            ),
            ("Sessions", "short", [("sum(sentientedge_sessions)", "sessions")]),
        ],
    ),
    "SentientEdge: throughput and latency": (
        "se-throughput",
        [
            (
                "Messages per second",
                "ops",
                [("sum by (direction) (websocket_messages_per_second)", "{{direction}}")],
            ),
            (
                "Message latency, router receive to socket write",
                "s",
                [
                    (
                        "histogram_quantile(0.5, sum by (le) "
                        "(rate(websocket_response_time_seconds_bucket[1m])))",
                        "p50",
                    ),
                    (
                        "histogram_quantile(0.95, sum by (le) "
                        "(rate(websocket_response_time_seconds_bucket[1m])))",
                        "p95",
                    ),
                    (
                        "histogram_quantile(0.99, sum by (le) "
                        "(rate(websocket_response_time_seconds_bucket[1m])))",
                        "p99",
                    ),
                ],
            ),
            (
                "Frames received by outcome (per second)",
                "ops",
                [
                    (
                        "sum by (outcome) (rate(sentientedge_messages_received_total[1m]))",
                        "{{outcome}}",
                    )
                ],
            ),
            (
                "Dropped by reason (per second)",
                "ops",
                [("sum by (reason) (rate(sentientedge_messages_dropped_total[1m]))", "{{reason}}")],
            ),
            (
                "QoS 1: stored, acked, redelivered (per second)",
                "ops",
                [
                    ("sum(rate(sentientedge_qos1_stored_total[1m]))", "stored"),
                    ("sum(rate(sentientedge_qos1_acks_total[1m]))", "acked"),
                    ("sum(rate(sentientedge_qos1_redelivered_total[1m]))", "redelivered"),
                ],
            ),
            (
                "Rate-limited frames (per second)",
                "ops",
                [("sum by (actor) (rate(sentientedge_rate_limited_total[1m]))", "{{actor}}")],
            ),
            (
                "Queues: stream backlog (ingress) and QoS 1 awaiting the store (shard)",
                "short",
                [
                    ("sentientedge_stream_backlog", "{{actor}} streams"),
                    ("sentientedge_store_backlog", "{{actor}} store"),
                ],
            ),
        ],
    ),
    "SentientEdge: resources": (
        "se-resources",
        [
            ("Node CPU", "percent", [("max by (node) (server_cpu_usage_percent)", "{{node}}")]),
            (
                "Node memory",
                "percent",
                [("max by (node) (server_memory_usage_percent)", "{{node}}")],
            ),
            (
                "CPU of each router process",
                "percentunit",
                [("rate(sentientedge_process_cpu_seconds_total[1m])", "{{actor}}")],
            ),
            (
                "Resident memory of each shard and the controller",
                "bytes",
                [("sentientedge_process_resident_memory_bytes", "{{actor}}")],
            ),
        ],
    ),
    "SentientEdge: failover and scaling": (
        "se-failover",
        [
            (
                "Failovers in the last hour, by kind",
                "short",
                [("sum by (kind) (increase(failover_events_total[1h]))", "{{kind}}")],
            ),
            (
                "Scaling steps in the last hour, by direction",
                "short",
                [("sum by (direction) (increase(scaling_events_total[1h]))", "{{direction}}")],
            ),
            (
                "Instances (one shard each) and ingresses",
                "short",
                [
                    ("sentientedge_instances", "instances"),
                    ("sentientedge_ingresses", "ingresses"),
                ],
            ),
            (
                "Away sessions dropped past their identity's bound (per second)",
                "ops",
                [("sum(rate(sentientedge_away_sessions_dropped_total[5m]))", "dropped")],
            ),
        ],
    ),
    "SentientEdge: Redis": (
        "se-redis",
        [
            (
                "Redis health as each process sees it (1 up, 0 down)",
                "short",
                [("min by (actor) (redis_cluster_health)", "{{actor}}")],
            ),
            (
                "QoS 1 batches Redis could not take (per second)",
                "ops",
                [("sum(rate(sentientedge_store_failures_total[1m]))", "failures")],
            ),
            (
                "QoS 1 stored and duplicates (per second)",
                "ops",
                [
                    ("sum(rate(sentientedge_qos1_stored_total[1m]))", "stored"),
                    ("sum(rate(sentientedge_qos1_duplicates_total[1m]))", "duplicate ids"),
                ],
            ),
            (
                "Retained topics and refusals",
                "short",
                [
                    ("sum(sentientedge_retained_topics)", "retained topics"),
                    ("sum(increase(sentientedge_retained_refused_total[1h]))", "refused (1 h)"),
                ],
            ),
        ],
    ),
    # The flight history (DATABASE_URL): flat at zero while no database is configured.
    "SentientEdge: database": (
        "se-database",
        [
            (
                "Connection pool in use (DB_POOL_SIZE), by process",
                "percentunit",
                [("database_connection_pool_usage", "{{actor}}")],
            ),
            (
                "Archived rows per second",
                "short",
                [
                    ("sum(rate(sentientedge_archive_rows_written_total[1m]))", "written"),
                    ("sum(rate(sentientedge_archive_rows_dropped_total[1m]))", "dropped"),
                ],
            ),
            (
                "Rows waiting for the database, by shard",
                "short",
                [("sentientedge_archive_backlog", "{{actor}}")],
            ),
            (
                "Archive writes failed (5 m)",
                "short",
                [("sum(increase(sentientedge_archive_failures_total[5m]))", "failed")],
            ),
        ],
    ),
}


def panel(index: int, title: str, unit: str, targets: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {
                "refId": chr(ord("A") + n),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": expr,
                "legendFormat": legend,
            }
            for n, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard(title: str, uid: str, panels: list[tuple[str, str, list[tuple[str, str]]]]) -> Any:
    return {
        "uid": uid,
        "title": title,
        "tags": ["sentientedge"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                }
            ]
        },
        "panels": [panel(n, *spec) for n, spec in enumerate(panels)],
    }


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for title, (uid, panels) in DASHBOARDS.items():
        path = OUT / f"{uid.removeprefix('se-')}.json"
        path.write_text(json.dumps(dashboard(title, uid, panels), indent=2) + "\n")
        print(path.relative_to(OUT.parent.parent))


if __name__ == "__main__":
    main()
