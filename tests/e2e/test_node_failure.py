"""Losing a whole Ray node: a multi-node cluster on this machine, the router keeps serving.

The cluster is made by scripts/chaos (head + worker nodes with ray.cluster_utils, the node
health check tuned as `sentientedge up` tunes it) in a process of its own: this test process is
already a driver of the session's cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO


def test_the_router_keeps_serving_when_nodes_die():
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "chaos.py"),
            "--kinds",
            "node",
            "--failures",
            "2",
            "--drones",
            "5",
            "--rate",
            "10",
            "--qos1-rate",
            "50",
            "--min-interval",
            "1",
            "--max-interval",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["qos1"]["acked"] > 0
    assert report["qos1"]["lost"] == 0
    node = report["by_kind"]["node"]
    assert node["count"] == 2
    assert node["service_returned_s"]["max"] < 30  # the design's promise; it is seconds
