"""Load balancer configurations (sentientedge/lb.py) and the static ones under deploy/."""

from __future__ import annotations

from sentientedge.lb import Backend, haproxy_config, nginx_config
from tests.helpers import REPO

LOCAL = [Backend("node-1", "127.0.0.1", 4000)]


def test_the_shipped_configurations_are_what_the_generator_writes_for_one_local_node():
    assert (REPO / "deploy" / "haproxy" / "haproxy.cfg").read_text() == haproxy_config(LOCAL)
    assert (REPO / "deploy" / "nginx" / "nginx.conf").read_text() == nginx_config(LOCAL)


def test_every_ingress_node_is_a_server_hashed_consistently_by_identity():
    nodes = [Backend("node-a", "10.0.0.1", 4000), Backend("node-b", "fd00::2", 4000)]
    haproxy = haproxy_config(nodes)
    assert "server node-a 10.0.0.1:4000 check" in haproxy
    assert "server node-b [fd00::2]:4000 check" in haproxy
    assert "balance hash var(txn.identity)" in haproxy and "hash-type consistent" in haproxy
    assert "option httpchk GET /health" in haproxy and "timeout tunnel" in haproxy
    nginx = nginx_config(nodes)
    assert "server 10.0.0.1:4000" in nginx and "server [fd00::2]:4000" in nginx
    assert "hash $identity consistent;" in nginx and "ssl_protocols TLSv1.3;" in nginx
    assert "proxy_set_header Upgrade $http_upgrade;" in nginx and "stub_status;" in nginx
