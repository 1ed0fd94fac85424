"""Every node serves: three Ray nodes on this machine, one joining and one leaving under load.

The cluster is made in a process of its own (tests/e2e/membership_peer.py): this test process
is already a driver of the session's cluster.
"""

from __future__ import annotations

from tests.e2e.support import run_peer


def test_nodes_that_join_serve_and_nodes_that_leave_lose_nothing():
    report = run_peer("tests.e2e.membership_peer")
    # Head and two workers: an ingress each, and each one took some of 30 clients.
    assert report["ingresses_per_node"] == [1, 1, 1]
    assert report["serving_nodes"] == 3
    # A node added later got its ingress, which took clients.
    assert report["new_node_connections"] > 0
    # A worker removed took its ingress with it; its clients resumed elsewhere, nothing lost.
    assert len(report["removed_node_ingresses"]) == 1
    assert report["acked"] > 100 and report["lost"] == 0
    assert report["ingresses_per_node_after"] == [1, 1, 1]
