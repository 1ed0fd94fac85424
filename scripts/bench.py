"""SentientEdge benchmarks: named scenarios of sentientedge.loadgen against a fresh local router.

    scripts/bench                                   # fan-in: 200 drones x 50 Hz -> 1 station
    scripts/bench --scenario fan-out                # 100 drones x 50 Hz -> 10 stations
    scripts/bench --scenario qos1                   # every message stored before its puback
    scripts/bench --scenario churn                  # 10% of links dropping, commands on top
    scripts/bench --scenario connections            # 10,000 idle connections on one node
    scripts/bench --scenario all
    scripts/bench --drones 300 --rate 50 --duration 20     # override a scenario's numbers

Each scenario starts its own router with ``sentientedge up`` (a local Ray head and an embedded
Redis unless ``--address`` says otherwise), runs, stops it, and prints one JSON line: the
loadgen summary plus the router's CPU and drops. The load runs in this process (a thread of
its own) unless ``--on-ray``, where it runs as Ray actors. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sentientedge.cli import default_actor_count
from sentientedge.loadgen import LoadRun, Scenario

SENTIENTEDGE = str(Path(sys.executable).parent / "sentientedge")

SCENARIOS: dict[str, dict[str, Any]] = {
    "fan-in": {"drones": 200, "rate_hz": 50, "stations": 1, "duration_s": 15},
    "fan-out": {"drones": 100, "rate_hz": 50, "stations": 10, "duration_s": 15},
    "qos1": {"drones": 100, "rate_hz": 50, "stations": 1, "duration_s": 15, "telemetry_qos": 1},
    "churn": {
        "drones": 200,
        "rate_hz": 20,
        "stations": 1,
        "duration_s": 20,
        "churn": 0.1,
        "churn_period_s": 3,
        "command_rate_hz": 20,
    },
    "connections": {"drones": 10_000, "rate_hz": 0.05, "stations": 0, "duration_s": 20},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRouter:
    def __init__(self, args: argparse.Namespace, extra_env: dict[str, str]) -> None:
        self.port = free_port()
        self.jwt_secret = uuid.uuid4().hex * 2
        self.api_key_secret = uuid.uuid4().hex * 2
        self.args = args
        self.env = dict(os.environ)
        self.env.update(
            {
                "PORT": str(self.port),
                "RAY_NAMESPACE": f"bench-{uuid.uuid4().hex[:6]}",
                "STATE_DIR": tempfile.mkdtemp(prefix="se-bench-"),
                "EMBEDDED_REDIS_PORT": str(free_port()),
                "JWT_SECRET": self.jwt_secret,
                "API_KEY_SECRET": self.api_key_secret,
                "RATE_LIMIT_MAX": "600000",
                **extra_env,
            }
        )

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def _cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        address = ["--address", self.args.address] if self.args.address else []
        return subprocess.run(
            [SENTIENTEDGE, *argv, *address],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def __enter__(self) -> LocalRouter:
        result = self._cli(
            "up", "--ingress", str(self.args.ingress), "--shards", str(self.args.shards)
        )
        if result.returncode != 0:
            raise SystemExit(f"sentientedge up failed:\n{result.stdout}\n{result.stderr}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._cli("down")

    def status(self) -> dict[str, Any]:
        result = self._cli("status", "--json")
        return json.loads(result.stdout) if result.returncode == 0 else {}


def _router_usage(status: dict[str, Any]) -> dict[str, Any]:
    usage: dict[str, Any] = {"cpu_s": {}, "drops": {}, "rss_mb": 0.0, "connections": 0}
    for group in ("ingresses", "shards"):
        for name, info in status.get(group, {}).items():
            if "cpu_s" in info:
                usage["cpu_s"][name] = info["cpu_s"]
    for info in status.get("ingresses", {}).values():
        for reason, count in info.get("dropped", {}).items():
            usage["drops"][reason] = usage["drops"].get(reason, 0) + count
        usage["rss_mb"] += info.get("rss_bytes", 0) / 2**20
        usage["connections"] += info.get("connections", 0)
    return usage


def bench(name: str, args: argparse.Namespace) -> dict[str, Any]:
    shape = dict(SCENARIOS[name])
    for option, key in (("drones", "drones"), ("rate", "rate_hz"), ("duration", "duration_s")):
        if getattr(args, option) is not None:
            shape[key] = getattr(args, option)
    extra_env = {"MAX_WS_CONNECTIONS": str(shape["drones"] + 100)}
    with LocalRouter(args, extra_env) as router:
        scenario = Scenario(
            url=router.url,
            jwt_secret=router.jwt_secret,
            api_key_secret=router.api_key_secret,
            workers=args.workers,
            **shape,
        )
        before = _router_usage(router.status())
        cpu = time.process_time()
        load = LoadRun(scenario, on_ray=args.on_ray)
        during: dict[str, Any] = {}
        if name == "connections":  # what the router holds while the fleet is connected
            time.sleep(max(0.0, load.plans[0].started_at - time.time()) + scenario.duration_s / 2)
            during = _router_usage(router.status())
        results = load.wait(progress=not args.quiet)
        loadgen_cpu = time.process_time() - cpu
        after = _router_usage(router.status())
    summary = results.summary()
    summary.pop("per_drone", None)
    report: dict[str, Any] = {"scenario": name, "ingress": args.ingress, "shards": args.shards}
    report.update(summary)
    report["router_drops"] = after["drops"]
    report["cpu_s"] = {
        "router": {k: round(v - before["cpu_s"].get(k, 0), 2) for k, v in after["cpu_s"].items()},
        "loadgen": round(loadgen_cpu, 2) if not args.on_ray else None,
    }
    if during:
        held = during["connections"]
        report["connections_held"] = held
        report["ingress_rss_mb"] = round(during["rss_mb"], 1)
        report["ingress_kb_per_connection"] = round(
            (during["rss_mb"] - before["rss_mb"]) * 1024 / max(held, 1), 1
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="fan-in")
    parser.add_argument("--drones", type=int)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--duration", type=float)
    parser.add_argument("--ingress", type=int, default=default_actor_count())
    parser.add_argument("--shards", type=int, default=default_actor_count())
    parser.add_argument("--workers", type=int, default=1, help="load-generator workers")
    parser.add_argument("--on-ray", action="store_true", help="load workers as Ray actors")
    parser.add_argument("--address", help="Ray cluster to use (default: a local head)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    for name in names:
        print(json.dumps(bench(name, args)), flush=True)


if __name__ == "__main__":
    main()
