"""HAProxy and NGINX (Debian's) in front of a router, on configurations `sentientedge lb` writes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sentientedge.client import Client
from tests.e2e.support import Router, next_on
from tests.helpers import eventually, free_port, self_signed


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin")
    if found is None:
        pytest.fail(f"{name} is not installed; scripts/setup installs it")
    return found


def _run(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
        start_new_session=True,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(20)


@pytest.fixture(scope="module")
def haproxy(router: Router, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    directory = tmp_path_factory.mktemp("haproxy")
    port, stats = free_port(), free_port()
    config, runtime = directory / "haproxy.cfg", directory / "haproxy.sock"
    result = router.cli(
        "lb", "haproxy", "--out", str(config), "--address", router.ray_address,
        "--bind", f"127.0.0.1:{port}", "--stats", f"127.0.0.1:{stats}", "--socket", str(runtime),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    check = subprocess.run([_binary("haproxy"), "-c", "-f", str(config)], capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    process = _run([_binary("haproxy"), "-db", "-f", str(config)], directory / "haproxy.log")
    try:
        yield {
            "url": f"ws://127.0.0.1:{port}/ws",
            "stats": f"http://127.0.0.1:{stats}/;csv",
            "runtime": str(runtime),
        }
    finally:
        _stop(process)


def _backend_up(stats_url: str) -> bool:
    try:
        with urllib.request.urlopen(stats_url, timeout=5) as answer:
            rows = answer.read().decode().splitlines()
    except OSError:
        return False
    servers = [row.split(",") for row in rows if row.startswith("ingresses,node-")]
    return bool(servers) and all(row[17] == "UP" for row in servers)


async def test_clients_talk_through_haproxy(router: Router, haproxy: dict[str, str]):
    await eventually(lambda: _backend_up(haproxy["stats"]), 30, "HAProxy's health check: UP")
    station = await Client.connect(haproxy["url"], token=router.token("operator", "via-lb"))
    await station.subscribe("drone/lb-1/telemetry", "drone/lb-1/event")
    drone = await Client.connect(haproxy["url"], api_key=router.api_key("lb-1"))
    await drone.publish("drone/lb-1/telemetry", {"alt": 10})
    assert (await next_on(station, "drone/lb-1/telemetry")).data == {"alt": 10}
    ack = await drone.publish("drone/lb-1/event", {"n": 1}, qos=1, id="lb-event-1")
    assert ack is not None and ack["id"] == "lb-event-1"
    assert (await next_on(station, "drone/lb-1/event")).data == {"n": 1}
    # The runtime API answers on its socket.
    with socket.socket(socket.AF_UNIX) as runtime:
        runtime.connect(haproxy["runtime"])
        runtime.sendall(b"show servers state ingresses\n")
        state = runtime.makefile().read()
    assert "node-" in state
    for client in (drone, station):
        await client.close()


@pytest.fixture(scope="module")
def nginx(router: Router, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    directory = tmp_path_factory.mktemp("nginx")
    directory.chmod(0o755)  # its workers run as another user
    cert, key, _ = self_signed(directory / "tls")
    port = free_port()
    config = directory / "nginx.conf"
    result = router.cli(
        "lb", "nginx", "--out", str(config), "--address", router.ray_address,
        "--bind", f"127.0.0.1:{port}", "--cert", str(cert), "--key", str(key),
        "--prefix", str(directory), "--pid", str(directory / "nginx.pid"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    nginx_binary = _binary("nginx")
    command = [nginx_binary, "-p", str(directory), "-c", str(config), "-g", "daemon off;"]
    check = subprocess.run([*command[:-2], "-t"], capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    process = _run(command, directory / "nginx.out")
    try:
        yield {"port": str(port), "cert": str(cert)}
    finally:
        _stop(process)


def _tls_version(port: int, cafile: str, maximum: ssl.TLSVersion | None = None) -> str | None:
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


async def test_nginx_terminates_tls_1_3_in_front_of_plain_ingresses(
    router: Router, nginx: dict[str, str]
):
    port = int(nginx["port"])
    assert await eventually(lambda: _tls_version(port, nginx["cert"]), 30, "nginx") == "TLSv1.3"
    assert _tls_version(port, nginx["cert"], ssl.TLSVersion.TLSv1_2) is None
    context = ssl.create_default_context(cafile=nginx["cert"])
    url = f"wss://127.0.0.1:{port}/ws"
    station = await Client.connect(url, token=router.token("observer", "via-nginx"), ssl=context)
    await station.subscribe("drone/ng-1/event")
    drone = await Client.connect(url, api_key=router.api_key("ng-1"), ssl=context)
    await drone.publish("drone/ng-1/event", {"n": 2}, qos=1, id="ng-event-1")
    assert (await next_on(station, "drone/ng-1/event")).data == {"n": 2}
    with urllib.request.urlopen(
        f"https://127.0.0.1:{port}/nginx_status", context=context, timeout=5
    ) as answer:
        assert "Active connections" in answer.read().decode()
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=context) as answer:
        assert answer.status == 200
    for client in (drone, station):
        await client.close()
