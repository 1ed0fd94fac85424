"""A real Prometheus (Debian's) scrapes a running router through deploy/prometheus's config."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sentientedge import state
from sentientedge.client import Client
from sentientedge.config import Config
from tests.e2e.support import RedisServer, Router, embedded_router, http_get, status
from tests.helpers import REPO, eventually, free_port

DEPLOY = REPO / "deploy" / "prometheus"
DESIGN_METRICS = (
    "websocket_connections_total",
    "websocket_messages_per_second",
    "websocket_response_time_seconds_bucket",
    "redis_cluster_health",
    "server_cpu_usage_percent",
    "server_memory_usage_percent",
    "failover_events_total",
    "scaling_events_total",
)


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as answer:
            document = json.loads(answer.read())
        assert document["status"] == "success", document
        return document["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expression)["result"])


@pytest.fixture(scope="module")
def observed(
    ray_cluster: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Router, Prometheus]]:
    """A router with its own Redis (the test stops it) and a Prometheus on the shipped config:
    the router's port in the discovery URL, one-second scrapes, and short ``for:`` in the
    copy of the alert rules."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed; scripts/setup installs it")
    directory = tmp_path_factory.mktemp("prometheus")
    with embedded_router(ray_cluster, redis_server, directory / "state") as router:
        config = (DEPLOY / "prometheus.yml").read_text()
        config = config.replace("127.0.0.1:4000", f"127.0.0.1:{router.port}")
        config = config.replace("scrape_interval: 15s", "scrape_interval: 1s")
        config = config.replace("evaluation_interval: 15s", "evaluation_interval: 1s")
        config = config.replace("refresh_interval: 30s", "refresh_interval: 1s")
        (directory / "prometheus.yml").write_text(config)
        rules = re.sub(r"for: \d+m", "for: 2s", (DEPLOY / "alerts.yml").read_text())
        (directory / "alerts.yml").write_text(rules)
        port = free_port()
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(directory / "prometheus.log", "wb"),  # noqa: SIM115
            start_new_session=True,
        )
        prometheus = Prometheus(f"http://127.0.0.1:{port}", process)
        try:
            yield router, prometheus
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(20)


def _targets_up(prometheus: Prometheus) -> list[dict[str, Any]] | None:
    try:
        active = prometheus.api("targets")["activeTargets"]
    except OSError:
        return None
    mine = [t for t in active if t["labels"]["job"] == "sentientedge"]
    # The embedded router: one ingress, one shard, the controller.
    if len(mine) == 3 and all(t["health"] == "up" for t in mine):
        return mine
    return None


async def test_prometheus_scrapes_every_process_and_every_design_metric(
    observed: tuple[Router, Prometheus],
):
    router, prometheus = observed
    targets = await eventually(lambda: _targets_up(prometheus), 60, "3 targets up")
    assert sorted(t["labels"]["role"] for t in targets) == ["controller", "ingress", "shard"]
    drone = await router.drone("observed-1")
    station = await router.person("observer")
    await station.subscribe("drone/+/telemetry")
    for n in range(150):  # within the drone's burst (DRONE_RATE_HZ 100, bursts of 200)
        await drone.publish("drone/observed-1/telemetry", {"n": n})
    await drone.ping()

    def present() -> bool:
        return all(prometheus.query(name) for name in DESIGN_METRICS)

    await eventually(present, 30, "the design's metrics in Prometheus")
    # Each series comes from one process: its node and actor labels name it, and no two
    # series of a metric share them.
    for name in DESIGN_METRICS:
        series = prometheus.query(name)
        # Without what Prometheus adds (job, instance, the discovery's labels), every series
        # is still told apart by its own labels, node and actor among them.
        added = {"job", "instance", "role", "router_actor"}
        keys = [
            tuple(sorted((k, v) for k, v in s["metric"].items() if k not in added)) for s in series
        ]
        assert all(dict(key).get("node") and dict(key).get("actor") for key in keys), name
        assert len(keys) == len(set(keys)), name
    await eventually(
        lambda: prometheus.query("websocket_connections_total == 2"), 10, "2 connections scraped"
    )
    # Counters never went backwards across the scrapes so far.
    for counter in (
        "sentientedge_messages_received_total",
        "sentientedge_messages_delivered_total",
        "sentientedge_handshakes_total",
        "sentientedge_process_cpu_seconds_total",
        "websocket_response_time_seconds_count",
    ):
        resets = prometheus.query(f"sum(resets({counter}[5m]))")
        assert resets and float(resets[0]["value"][1]) == 0, counter
    await eventually(
        lambda: prometheus.query("sum(sentientedge_messages_delivered_total) >= 150"),
        10,
        "the deliveries counted",
    )
    for client in (drone, station):
        await client.close()


async def test_redis_cluster_down_fires_when_redis_stops(observed: tuple[Router, Prometheus]):
    router, prometheus = observed
    await eventually(lambda: _targets_up(prometheus), 60, "3 targets up")

    def alert_state() -> str | None:
        for alert in prometheus.api("alerts")["alerts"]:
            if alert["labels"]["alertname"] == "RedisClusterDown":
                return str(alert["state"])
        return None

    await eventually(lambda: prometheus.query("redis_cluster_health == 1"), 30, "redis healthy")
    assert alert_state() is None
    pidfile = Path(router.env["STATE_DIR"]) / "redis" / "redis.pid"
    os.kill(int(pidfile.read_text()), signal.SIGTERM)
    await eventually(lambda: alert_state() == "firing", 60, "RedisClusterDown firing")
    assert prometheus.query("redis_cluster_health == 0")
    # The alert is the router's word for it: a client's QoS 1 publish is refused too.
    client = await Client.connect(router.url, token=router.token("operator", "ops"))
    with pytest.raises(Exception, match="unavailable"):
        await client.publish("fleet/x/log", 1, qos=1, timeout=10)
    await client.close()


# Features off in this router whose metrics are not exported at all (none now: the flight
# history's are exported as zeros without DATABASE_URL).
OFF: set[str] = set()
METRIC_NAME = re.compile(
    r"\b(?:websocket|sentientedge|redis|server|failover|scaling|database)_[a-z_]+\b"
)


def dashboard_queries() -> list[tuple[str, str]]:
    queries = []
    for path in sorted((REPO / "deploy" / "grafana").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                queries.append((f"{path.name}: {panel['title']}", target["expr"]))
    return queries


async def test_every_dashboard_query_runs_and_names_only_exported_metrics(
    observed: tuple[Router, Prometheus],
):
    router, prometheus = observed
    await eventually(lambda: _targets_up(prometheus), 60, "3 targets up")
    # What the router exports: every family it describes, samples yet or not.
    status, _, body = http_get(f"{router.http}/metrics")
    assert status == 200
    exported = {
        family.name + suffix
        for family in text_string_to_metric_families(body.decode())
        for suffix in ("", "_total", "_bucket", "_count", "_sum")
    }
    queries = dashboard_queries()
    assert len({where.split(":")[0] for where, _ in queries}) == 6
    for where, expr in queries:
        prometheus.query(expr)  # a bad query is answered 400: urlopen raises
        unknown = set(METRIC_NAME.findall(expr)) - exported - OFF
        assert not unknown, f"{where}: {sorted(unknown)}"


def test_router_processes_log_json_lines_without_secrets(observed: tuple[Router, Prometheus]):
    import ray

    router, _ = observed
    report = status(router)
    pids = [s["pid"] for s in (*report["ingresses"].values(), *report["shards"].values())]
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [path for pid in pids for path in logs.glob(f"worker-*-{pid}.err")]
    assert len(files) == len(pids)
    lines = [line for path in files for line in path.read_text().splitlines() if line]
    # Ray marks whose output follows (":actor_name:Ingress"); every other line is ours, JSON.
    ours = [json.loads(line) for line in lines if not line.startswith(":")]
    assert any(e["actor"] == "ingress-0" and "listening" in e["event"] for e in ours)
    assert all({"ts", "level", "component", "node", "actor", "event"} <= set(e) for e in ours)
    secrets = state.ensure_secrets(Config.from_env(router.env))
    text = "\n".join(lines)
    for secret in (
        secrets.jwt_secret,
        secrets.api_key_secret,
        state.embedded_redis_password(secrets),
        router.api_key("observed-1"),  # the key the drone above connected with
    ):
        assert secret and secret not in text
