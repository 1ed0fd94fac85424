"""sentientedge.loadgen against a real router: exact counts, clear failures, Ray workers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest

from sentientedge.loadgen import LatencyHistogram, Scenario, ScenarioError, run
from tests.e2e.support import API_KEY_SECRET, JWT_SECRET, Router
from tests.helpers import REPO, free_port


def scenario(router: Router, **shape: object) -> Scenario:
    defaults: dict[str, object] = {
        "url": router.url,
        "drones": 10,
        "rate_hz": 20,
        "duration_s": 3,
        "stations": 2,
        "jwt_secret": JWT_SECRET,
        "api_key_secret": API_KEY_SECRET,
        "drone_prefix": f"lg-{uuid.uuid4().hex[:6]}",
    }
    return Scenario(**{**defaults, **shape})  # type: ignore[arg-type]


async def _run(s: Scenario):  # the load runs in a thread of its own; this loop stays free
    return await asyncio.to_thread(run, s, progress=False)


async def test_counts_add_up_and_latency_is_ordered(router: Router):
    results = await _run(scenario(router, command_rate_hz=5))
    summary = results.summary()
    # Every drone flew its 3 s at 20 Hz, and each of the 2 stations had every message once.
    assert all(58 <= sent <= 61 for sent in results.tally.sent.values())
    assert summary["expected"] == 2 * summary["offered"]
    assert summary["delivered"] + summary["lost"] == summary["expected"]
    assert summary["lost"] == 0 and summary["duplicated"] == 0
    latency = summary["latency_ms"]
    assert (
        0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99.9"] <= latency["max"]
    )
    # QoS 1 commands: every one acknowledged reached its drone, and its result came back.
    commands = summary["commands"]
    assert commands["acked"] >= 10 and commands["failed"] == 0
    assert commands["received_by_drones"] == commands["acked"] == commands["results"]
    rows = results.to_rows()
    assert sum(r["sent"] for r in rows) == summary["offered"]
    assert json.loads(results.to_json())["summary"]["offered"] == summary["offered"]
    assert {row["drone"] for row in results.per_drone()} == set(results.tally.sent)


async def test_churning_links_resume_and_nothing_is_counted_twice(router: Router):
    results = await _run(scenario(router, churn=0.5, churn_period_s=1.0, command_rate_hz=5))
    summary = results.summary()
    assert summary["reconnects"] >= 1
    assert summary["delivered"] + summary["lost"] == summary["expected"]
    assert summary["commands"]["received_by_drones"] == summary["commands"]["acked"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rate_hz": -5}, "rate_hz must be positive"),
        ({"drones": 0}, "drones must be at least 1"),
        ({"churn": 2}, "churn is a share"),
        ({"station_topics": ("drone/#/x",)}, "station topic"),
        ({"jwt_secret": None, "api_key_secret": None}, "drones need credentials"),
    ],
)
def test_bad_values_fail_at_once(router: Router, change, message):
    with pytest.raises(ScenarioError, match=message):
        run(scenario(router, **change), progress=False)


def test_an_unreachable_router_fails_at_once(router: Router):
    with pytest.raises(ScenarioError, match="cannot reach"):
        run(scenario(router, url=f"ws://127.0.0.1:{free_port()}/ws"), progress=False)


def test_wrong_credentials_fail_at_once(router: Router):
    with pytest.raises(ScenarioError, match=r"refused the drone credentials \(HTTP 401\)"):
        run(scenario(router, api_key_secret="not-the-secret-" + "x" * 20), progress=False)
    with pytest.raises(ScenarioError, match="refused the station credentials"):
        run(scenario(router, station_token="garbage"), progress=False)


def test_histogram_percentiles_within_two_percent():
    histogram = LatencyHistogram()
    for ms in range(1, 1001):
        histogram.add(ms / 1000)
    assert histogram.percentile(0.5) == pytest.approx(0.5, rel=0.03)
    assert histogram.percentile(0.99) == pytest.approx(0.99, rel=0.03)
    other = LatencyHistogram()
    other.add(2.0)
    histogram.merge(other)
    assert histogram.total == 1001 and histogram.max_s == 2.0


def test_load_spread_over_two_ray_nodes_runs_on_both():
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "e2e" / "two_node_loadgen.py")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["nodes"]) == 2 and len(set(report["nodes"])) == 2
    summary = report["summary"]
    assert summary["offered"] > 0 and summary["lost"] == 0
    assert summary["delivered"] == summary["expected"]
