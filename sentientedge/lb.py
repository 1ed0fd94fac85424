"""Configurations for the load balancers in front of the ingress nodes: HAProxy and NGINX.

Rules for this module:
- Pure: backends in, configuration text out. ``sentientedge lb haproxy|nginx`` feeds it the live
  ingress nodes (from the controller); ``deploy/haproxy`` and ``deploy/nginx`` hold its output
  for one local node, for static use.
- Stickiness by identity with consistent hashing, so a drone's reconnects land on the node that
  holds its session while that node lives (and only the keys of a node that leaves move).
  Both hash the drone an API key names (``sek2.<drone>.…``: a drone's next key keeps its node);
  HAProxy hashes a token's ``sub`` (read from the JWT, not verified: it only picks a node),
  NGINX, without a JWT parser, the token as sent.
- WebSockets: long tunnel / read timeouts (keepalive pings every ``PING_INTERVAL`` keep them
  open), health checks on ``GET /health`` (503 while draining or without Redis: the node is
  taken out and its clients resume on the others).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    """One ingress node: where its ingresses listen (``PORT`` on the node's address)."""

    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def haproxy_config(
    backends: list[Backend],
    *,
    bind: str = "*:80",
    stats_bind: str = "127.0.0.1:8404",
    runtime_socket: str = "/run/haproxy/sentientedge.sock",
    tunnel_timeout_s: int = 3600,
) -> str:
    servers = "\n".join(
        f"    server {b.name} {b.address} check inter 2s fall 2 rise 2" for b in backends
    )
    unset = "if !{ var(txn.identity) -m found }"
    return f"""# SentientEdge behind HAProxy (written by `sentientedge lb haproxy`).
global
    # No maxconn: HAProxy takes it from the file descriptor limit it gets (ulimit -n).
    # The runtime API: `echo "show servers state" | socat stdio {runtime_socket}`
    stats socket {runtime_socket} mode 600 level admin

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    # Once a WebSocket is upgraded the connection is a tunnel: quiet for up to this long.
    timeout tunnel {tunnel_timeout_s}s
    timeout client-fin 10s
    option forwardfor
    # A node that refuses a connection (drained, or down before its health check says so):
    # the connection is tried on another node at once, not answered 503.
    retries 2
    option redispatch 1

frontend sentientedge
    bind {bind}
    default_backend ingresses

backend ingresses
    # The identity a connection presents, for stickiness: the drone an API key names (its
    # second dot-separated field), else the token's sub. A drone's new key keeps its node.
    http-request set-var(txn.identity) req.hdr(X-API-Key),field(2,.)
    http-request set-var(txn.identity) url_param(api_key),field(2,.) {unset}
    http-request set-var(txn.identity) http_auth_bearer,jwt_payload_query('$.sub') {unset}
    http-request set-var(txn.identity) url_param(token),jwt_payload_query('$.sub') {unset}
    balance hash var(txn.identity)
    hash-type consistent
    option httpchk GET /health
    http-check expect status 200
{servers}

frontend stats
    bind {stats_bind}
    stats enable
    stats uri /
    stats refresh 10s
"""


def nginx_config(
    backends: list[Backend],
    *,
    listen: str = "443",
    certificate: str = "/etc/sentientedge/tls/cert.pem",
    certificate_key: str = "/etc/sentientedge/tls/key.pem",
    prefix: str = "/var/lib/nginx",
    pid: str = "/run/nginx-sentientedge.pid",
    read_timeout_s: int = 3600,
) -> str:
    servers = "\n".join(
        f"        server {b.address} max_fails=2 fail_timeout=5s;" for b in backends
    )
    proxy = f"""            proxy_pass http://sentientedge;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
            proxy_read_timeout {read_timeout_s}s;
            proxy_send_timeout {read_timeout_s}s;
            proxy_buffering off;"""
    return f"""# SentientEdge behind NGINX, TLS 1.3 here (written by `sentientedge lb nginx`).
worker_processes auto;
pid {pid};
error_log {prefix}/error.log warn;

events {{
    worker_connections 20000;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' close;
    }}
    # The identity a connection presents, for stickiness: the drone an API key names (its
    # second dot-separated field), else the token as sent (NGINX cannot read a JWT's sub).
    map $http_x_api_key$arg_api_key $drone_in_key {{
        "~^sek[0-9]+\\.([^.]+)\\." $1;
        default "";
    }}
    map $drone_in_key $identity {{
        "" $http_authorization$arg_token;
        default $drone_in_key;
    }}

    upstream sentientedge {{
        hash $identity consistent;
{servers}
        keepalive 64;
    }}

    server {{
        listen {listen} ssl;
        ssl_certificate {certificate};
        ssl_certificate_key {certificate_key};
        ssl_protocols TLSv1.3;
        ssl_session_cache shared:sentientedge:10m;

        location = /nginx_status {{
            stub_status;
            allow 127.0.0.1;
            allow ::1;
            deny all;
        }}

        location / {{
{proxy}
        }}
    }}
}}
"""
