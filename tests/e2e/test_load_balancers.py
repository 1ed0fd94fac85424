"""HAProxy and NGINX (Debian's) in front of two router nodes, on configurations `sentientedge lb`
writes from the live cluster. The cluster and the balancers run in tests/e2e/balancer_peer.py,
a process of its own (this one already drives the session's Ray cluster)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.support import run_peer


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return run_peer("tests.e2e.balancer_peer")


def test_each_node_serves_on_its_own_port_and_both_are_backends(report: dict[str, Any]):
    assert report["serving_ports"] == sorted(report["node_ports"])
    assert report["haproxy_backends"] == 2


@pytest.mark.parametrize("balancer", ["haproxy", "nginx"])
def test_clients_talk_through_the_balancer_and_a_drone_keeps_its_node(
    report: dict[str, Any], balancer: str
):
    seen = report[balancer]
    assert seen["qos0"] and seen["qos1"] and seen["command"]
    # Twelve drones, three connections each (the last with a newly issued key): each drone
    # always on one node, and the drones spread over both.
    assert seen["sticky"]
    assert seen["ingresses_used"] == 2


def test_nginx_terminates_tls_1_3_and_serves_its_status(report: dict[str, Any]):
    assert report["nginx_tls"] == "TLSv1.3"
    assert report["nginx_tls_1_2"] is None  # a TLS 1.2-only client is refused
    assert report["nginx_status"]


@pytest.mark.parametrize("balancer", ["haproxy", "nginx"])
def test_a_drained_node_leaves_and_its_clients_resume_on_the_other_losing_nothing(
    report: dict[str, Any], balancer: str
):
    drain = report[f"{balancer}_drain"]
    assert drain["drain_output"].startswith(f"{drain['drained']}: ")
    assert drain["station_now_on"] != drain["drained"]
    assert drain["acked"] > 100 and drain["lost"] == 0


def test_haproxy_health_check_takes_the_drained_node_out(report: dict[str, Any]):
    assert report["haproxy_drain"]["health_check_took_it_out"] < 30
    assert report["runtime_api"]
