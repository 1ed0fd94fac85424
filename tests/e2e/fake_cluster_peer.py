"""cluster.yaml on Ray's fake multi-node provider (run by test_ray_up_fake.py, isolated).

`ray up` itself needs SSH to real machines; this runs what it would run on the head, on this
machine: the config as `ray up` prepares it (``ray_bootstrap_config.yaml``) with the provider
swapped for ``fake_multinode`` (worker nodes are raylets on this machine, started by Ray's own
autoscaler), then cluster.yaml's ``head_start_ray_commands`` word for word but for paths and
ports. Load on the router makes its autoscaler want one more instance; Ray's autoscaler adds a
node for it; the node gets an ingress that takes clients. Then the router and Ray are stopped.

Prints one JSON line. Runs in its own PID and mount namespace with a private /tmp (the test
starts it so): nothing here can touch another Ray on the machine, and everything it started
dies with it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from sentientedge import auth, state
from sentientedge.client import Client
from sentientedge.config import Config

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DEADLINE_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bootstrap_config(gcs_address: str) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    config = copy.deepcopy(config)
    config["provider"] = {
        "type": "fake_multinode",
        "gcs_address": gcs_address,
        # The fake provider starts a node's raylet itself: nothing to install or run over SSH
        # (what cluster.yaml's setup and worker commands do on a real machine).
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    }
    head = config["head_node_type"]
    types = config["available_node_types"]
    # The fake provider names the head's type itself; nodes are raylets with these resources.
    # No worker at the start (cluster.yaml asks 2): the one this run needs comes from load.
    types["ray.head.default"] = {"node_config": {}, "resources": {"CPU": 2}, "max_workers": 0}
    del types[head]
    types["worker"].update(node_config={}, resources={"CPU": 2}, min_workers=0, max_workers=1)
    config["head_node_type"] = "ray.head.default"
    config["max_workers"] = 1
    return config


def head_commands(config_path: Path, gcs_port: int, port: int) -> list[str]:
    commands = yaml.safe_load((REPO / "cluster.yaml").read_text())["head_start_ray_commands"]
    replaced = []
    for command in commands:
        command = command.replace("~/sentientedge/.venv/bin/", f"{VENV_BIN}/")
        command = command.replace(" .venv/bin/", f" {VENV_BIN}/")
        command = command.replace("cd ~/sentientedge", f"cd {REPO}")
        command = command.replace("~/ray_bootstrap_config.yaml", str(config_path))
        command = command.replace("--port=6379", f"--port={gcs_port}")
        command = command.replace("PORT=4000", f"PORT={port}")
        replaced.append(command)
    return replaced


def live_processes() -> set[str]:
    """Names of the processes running here (not the exited ones nobody reaped yet)."""
    listing = subprocess.run(
        ["ps", "-eo", "stat=,comm="], capture_output=True, text=True, check=True
    ).stdout
    return {line.split(None, 1)[1] for line in listing.splitlines() if not line.startswith("Z")}


def http_json(url: str, token: str) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


async def eventually(condition: Any, what: str) -> float:
    started = time.monotonic()
    while True:
        try:
            if condition():
                return round(time.monotonic() - started, 2)
        except OSError:
            pass  # the router not answering yet
        if time.monotonic() - started > DEADLINE_S:
            raise TimeoutError(f"no {what} within {DEADLINE_S:.0f} s")
        await asyncio.sleep(0.5)


async def main() -> dict[str, Any]:
    work = Path("/tmp/fake-cluster")
    work.mkdir(parents=True, exist_ok=True)
    gcs_port, port = free_port(), free_port()
    import ray

    node_ip = ray.util.get_node_ip_address()
    config_path = work / "ray_bootstrap_config.yaml"
    config_path.write_text(yaml.safe_dump(bootstrap_config(f"{node_ip}:{gcs_port}")))
    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_AUTH_TOKEN_PATH": str(token),  # cluster.yaml copies it to ~/.ray/auth_token
        "STATE_DIR": str(work / "state"),
        "EMBEDDED_REDIS_PORT": str(free_port()),
        # Utilisation by connections, with thresholds a test reaches in seconds.
        "MAX_WS_CONNECTIONS": "40",
        "SCALE_UP_THRESHOLD": "0.25",
        "SCALE_DOWN_THRESHOLD": "0.05",
        "SCALE_WINDOW": "2000",
        "SCALE_UP_COOLDOWN": "1000",
        "MAX_INSTANCES": "3",
    }
    report: dict[str, Any] = {}
    for command in head_commands(config_path, gcs_port, port):
        result = subprocess.run(
            ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"{command[:120]}... failed:\n{result.stdout}\n{result.stderr}")
    config = state.ensure_secrets(Config.from_env(env))
    assert config.jwt_secret is not None
    admin = auth.mint_jwt(config.jwt_secret, "root", "admin", 3600, amr=["pwd", "otp"])
    status_url = f"http://127.0.0.1:{port}/admin/cluster-status"
    url = f"ws://127.0.0.1:{port}/ws"

    def person(sub: str, role: str = "observer") -> Any:
        assert config.jwt_secret is not None
        return Client.connect(url, token=auth.mint_jwt(config.jwt_secret, sub, role, 3600))

    first = http_json(status_url, admin)
    heads = [node_id for node_id, n in first["nodes"].items() if n["alive"]]
    report["nodes_at_start"] = len(heads)
    report["instances_at_start"] = first["scaling"]["instances"]
    station = await person("station")
    await station.subscribe("fleet/fake/#")
    operator = await person("operator", "operator")
    await operator.publish("fleet/fake/hello", {"n": 1}, qos=1)
    report["routed"] = (await station.recv(timeout=10)).data == {"n": 1}

    # Load: 24 more connections on 2 instances of 40 is 0.33, over the threshold of 0.25.
    crowd = [await person(f"crowd-{i}") for i in range(24)]
    started = time.monotonic()

    def new_node_serves() -> bool:
        scaling = http_json(status_url, admin)["scaling"]
        nodes = http_json(status_url, admin)["nodes"]
        added = [n for k, n in nodes.items() if n["alive"] and k not in heads]
        return bool(added and added[0]["ingresses"]) and not scaling["in_progress"]

    await eventually(new_node_serves, "node added by the autoscaler and serving")
    report["load_to_serving_node_s"] = round(time.monotonic() - started, 2)
    late = [await person(f"late-{i}") for i in range(30)]
    final = http_json(status_url, admin)
    alive = {k: n for k, n in final["nodes"].items() if n["alive"]}
    report["nodes"] = len(alive)
    report["added_node"] = next(
        {"ingresses": n["ingresses"], "shards": n["shards"], "connections": n["connections"]}
        for k, n in alive.items()
        if k not in heads
    )
    report["instances"] = final["scaling"]["instances"]
    report["scaling_events"] = [
        (e["direction"], e["instances"], e["target"], e["status"])
        for e in final["scaling"]["events"]
    ]
    await operator.publish("fleet/fake/after", {"n": 2}, qos=1)
    report["routed_after"] = (await station.recv(timeout=10)).data == {"n": 2}
    for client in [station, operator, *crowd, *late]:
        await client.close()

    operator_env = {**env, "RAY_AUTH_MODE": "token"}  # as cluster.yaml tells operators
    down = subprocess.run(
        [str(VENV_BIN / "sentientedge"), "down", "--address", "auto"],
        env=operator_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    stop = subprocess.run(
        [str(VENV_BIN / "ray"), "stop"],
        env=operator_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report["down"] = down.returncode == 0 and stop.returncode == 0
    report["down"] = (
        report["down"]
        and await eventually(
            lambda: "raylet" not in live_processes(),
            "every raylet stopped",
        )
        >= 0
    )
    return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())), flush=True)
