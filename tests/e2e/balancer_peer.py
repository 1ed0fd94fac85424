"""HAProxy and NGINX in front of two router nodes on this machine (run by
test_load_balancers.py, in a process of its own: the test process already drives the session's
Ray cluster).

Two Ray nodes, each labelled with a port of its own (``sentientedge/port``), so each node's
ingress is a backend the balancers can address. Both balancers run Debian's servers on the
configurations ``sentientedge lb`` writes from the live cluster. The process prints one JSON
line: what each step saw; the test asserts on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from actors.local_cluster import LocalCluster, free_port
from sentientedge import auth
from sentientedge.client import Client
from tests.e2e.support import QosLoad, next_on
from tests.helpers import self_signed

DEADLINE_S = 60.0


class People:
    """What QosLoad needs of a router, through one balancer."""

    def __init__(self, cluster: LocalCluster, url: str, tls: ssl.SSLContext | None) -> None:
        self.cluster = cluster
        self.url = url
        self.tls = tls
        self.keys: dict[str, str] = {}

    async def person(self, role: str, sub: str, **kwargs: Any) -> Client:
        token = auth.mint_jwt(self.cluster.jwt_secret, sub, role, 3600)
        return await self.connect(token=token, **kwargs)

    async def drone(self, drone_id: str, new_key: bool = False, **kwargs: Any) -> Client:
        if new_key or drone_id not in self.keys:
            self.keys[drone_id] = auth.issue_api_key(self.cluster.api_key_secret, drone_id).key
        return await self.connect(api_key=self.keys[drone_id], **kwargs)

    async def connect(self, **kwargs: Any) -> Client:
        if self.tls is not None:
            kwargs["ssl"] = self.tls
        return await Client.connect(self.url, **kwargs)


def binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin")
    if found is None:
        raise SystemExit(f"{name} is not installed; scripts/setup installs it")
    return found


def run(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(20)


async def wait_for(condition: Any, what: str) -> float:
    started = time.monotonic()
    while not await asyncio.to_thread(condition):
        if time.monotonic() - started > DEADLINE_S:
            raise TimeoutError(f"no {what} within {DEADLINE_S} s")
        await asyncio.sleep(0.2)
    return round(time.monotonic() - started, 2)


def haproxy_servers(stats_url: str) -> dict[str, str]:
    """HAProxy's view of each backend server: UP, DOWN, ..."""
    try:
        with urllib.request.urlopen(stats_url, timeout=5) as answer:
            rows = [row.split(",") for row in answer.read().decode().splitlines()]
    except OSError:
        return {}
    return {row[1]: row[17] for row in rows if row[0] == "ingresses" and row[1].startswith("node-")}


def tls_version(port: int, cafile: str, maximum: ssl.TLSVersion | None = None) -> str | None:
    context = ssl.create_default_context(cafile=cafile)
    if maximum is not None:
        context.maximum_version = maximum
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            return tls.version()
    except (OSError, ssl.SSLError):
        return None


def serving_ports(cluster: LocalCluster) -> list[int]:
    from actors import ray_api

    controller = ray_api.get_actor(ray_api.CONTROLLER, cluster.namespace)
    nodes = ray_api.call_sync(controller, "cluster_status")["nodes"].values()
    return sorted(n["port"] for n in nodes if n["alive"] and n["ingresses"] and "port" in n)


async def exchange(people: People, tag: str) -> dict[str, Any]:
    """A station and drones through the balancer: QoS 0 and QoS 1 both ways, and where each
    drone's connections land (its ingress, ``welcome.server``) over three reconnects, the last
    with a new key."""
    station = await people.person("operator", f"st-{tag}")
    await station.subscribe(f"drone/{tag}-0/telemetry", f"drone/{tag}-0/event")
    drone = await people.drone(f"{tag}-0")
    await drone.subscribe(f"drone/{tag}-0/cmd")
    await drone.publish(f"drone/{tag}-0/telemetry", {"alt": 10})
    qos0 = (await next_on(station, f"drone/{tag}-0/telemetry")).data == {"alt": 10}
    await drone.publish(f"drone/{tag}-0/event", {"n": 1}, qos=1, id=f"{tag}-e1")
    qos1 = (await next_on(station, f"drone/{tag}-0/event")).data == {"n": 1}
    await station.publish(f"drone/{tag}-0/cmd", {"command": "land"}, qos=1, id=f"{tag}-c1")
    command = (await next_on(drone, f"drone/{tag}-0/cmd")).data == {"command": "land"}
    for client in (station, drone):
        await client.close()

    landings: dict[str, list[str]] = {}
    for i in range(12):
        drone_id = f"{tag}-{i}"
        for attempt in range(3):  # the last time with a key issued since
            client = await people.drone(drone_id, new_key=attempt == 2)
            landings.setdefault(drone_id, []).append(client.welcome.server)
            await client.close()
    return {
        "qos0": qos0,
        "qos1": qos1,
        "command": command,
        "sticky": all(len(set(servers)) == 1 for servers in landings.values()),
        "ingresses_used": len({servers[0] for servers in landings.values()}),
    }


async def drain_under_load(cluster: LocalCluster, people: People, tag: str) -> dict[str, Any]:
    """QoS 1 load through the balancer; the ingress holding the station drains; everyone
    resumes on the other node through the balancer."""
    load = QosLoad(people, tag)  # type: ignore[arg-type]
    await load.start()
    await load.acked_count_reaches(50, timeout=DEADLINE_S)
    drained = load.station.welcome.server
    result = await asyncio.to_thread(cluster.cli, "drain", drained, "--address", cluster.address)
    await load.acked_count_reaches(50, timeout=DEADLINE_S)
    await load.finish()
    load.check()
    report = {
        "drained": drained,
        "station_now_on": load.station.welcome.server,
        "acked": len(load.acked),
        "lost": len(load.acked - {m.data["n"] for m in load.received}),
        "drain_output": result.stdout.strip(),
    }
    for client in (load.station, load.operator):
        await client.close()
    return report


async def main() -> dict[str, Any]:
    report: dict[str, Any] = {}
    directory = Path(tempfile.mkdtemp(prefix="se-balancers-"))
    directory.chmod(0o755)  # NGINX's workers run as another user
    settings = {"AUTOSCALE": "false", "RATE_LIMIT_MAX": "60000", "TRUSTED_PROXIES": "127.0.0.1"}
    with LocalCluster(workers=1, ingresses=2, shards=2, node_ports=True, **settings) as cluster:
        report["node_ports"] = cluster.node_ports
        await wait_for(lambda: len(serving_ports(cluster)) == 2, "ingress on both nodes")
        report["serving_ports"] = serving_ports(cluster)

        port, stats = free_port(), free_port()
        haproxy_cfg, runtime = directory / "haproxy.cfg", directory / "haproxy.sock"
        cluster.cli(
            "lb", "haproxy", "--out", str(haproxy_cfg), "--address", cluster.address,
            "--bind", f"127.0.0.1:{port}", "--stats", f"127.0.0.1:{stats}",
            "--socket", str(runtime),
        )  # fmt: skip
        report["haproxy_backends"] = haproxy_cfg.read_text().count("    server node-")
        check = subprocess.run(
            [binary("haproxy"), "-c", "-f", str(haproxy_cfg)], capture_output=True, check=False
        )
        assert check.returncode == 0, check.stdout + check.stderr
        haproxy = run([binary("haproxy"), "-db", "-f", str(haproxy_cfg)], directory / "ha.log")

        cert, key, _ = self_signed(directory / "tls")
        tls_port, nginx_cfg = free_port(), directory / "nginx.conf"
        cluster.cli(
            "lb", "nginx", "--out", str(nginx_cfg), "--address", cluster.address,
            "--bind", f"127.0.0.1:{tls_port}", "--cert", str(cert), "--key", str(key),
            "--prefix", str(directory), "--pid", str(directory / "nginx.pid"),
        )  # fmt: skip
        nginx_command = [binary("nginx"), "-p", str(directory), "-c", str(nginx_cfg)]
        check = subprocess.run([*nginx_command, "-t"], capture_output=True, check=False)
        assert check.returncode == 0, check.stderr
        nginx = run([*nginx_command, "-g", "daemon off;"], directory / "nginx.out")
        try:
            stats_url = f"http://127.0.0.1:{stats}/;csv"
            await wait_for(
                lambda: list(haproxy_servers(stats_url).values()) == ["UP", "UP"],
                "both nodes UP in HAProxy",
            )
            via_haproxy = People(cluster, f"ws://127.0.0.1:{port}/ws", None)
            report["haproxy"] = await exchange(via_haproxy, f"h{uuid.uuid4().hex[:4]}")

            await wait_for(lambda: tls_version(tls_port, str(cert)) is not None, "NGINX")
            report["nginx_tls"] = tls_version(tls_port, str(cert))
            report["nginx_tls_1_2"] = tls_version(tls_port, str(cert), ssl.TLSVersion.TLSv1_2)
            context = ssl.create_default_context(cafile=str(cert))
            via_nginx = People(cluster, f"wss://127.0.0.1:{tls_port}/ws", context)
            report["nginx"] = await exchange(via_nginx, f"n{uuid.uuid4().hex[:4]}")
            with urllib.request.urlopen(
                f"https://127.0.0.1:{tls_port}/nginx_status", context=context, timeout=5
            ) as answer:
                report["nginx_status"] = "Active connections" in answer.read().decode()

            drain = await drain_under_load(cluster, via_haproxy, f"dh{uuid.uuid4().hex[:4]}")
            drain["health_check_took_it_out"] = await wait_for(
                lambda: "DOWN" in haproxy_servers(stats_url).values(), "the drained node DOWN"
            )
            report["haproxy_drain"] = drain
            with socket.socket(socket.AF_UNIX) as api:
                api.connect(str(runtime))
                api.sendall(b"show servers state ingresses\n")
                report["runtime_api"] = "node-" in api.makefile().read()

            # The drained ingress comes back (a new process); then NGINX's turn, the other one.
            cluster.cli("drain", drain["drained"], "--restart", "--address", cluster.address)
            await wait_for(
                lambda: list(haproxy_servers(stats_url).values()) == ["UP", "UP"],
                "the restarted node UP again",
            )
            report["nginx_drain"] = await drain_under_load(
                cluster, via_nginx, f"dn{uuid.uuid4().hex[:4]}"
            )
        finally:
            stop(haproxy)
            stop(nginx)
            shutil.rmtree(directory, ignore_errors=True)
    return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())), flush=True)
    sys.exit(0)
