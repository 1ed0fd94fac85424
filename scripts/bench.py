"""SentientEdge benchmarks: start a local router, drive load over 127.0.0.1, print JSON lines.

    scripts/bench                                  # fan-in: 200 drones x 50 Hz -> 1 subscriber
    scripts/bench --scenario connections           # 10,000 idle connections on one node
    scripts/bench --drones 300 --rate 50 --duration 20 --ingress 2 --shards 2

Every scenario starts its own router with ``sentientedge up`` (a local Ray head and an embedded
Redis unless ``--address`` / ``REDIS_URL`` say otherwise) and stops it with ``down``. Load runs
in separate processes so it does not share an event loop with what it measures. All traffic is
bounded in count and time and goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sentientedge import auth
from sentientedge.cli import default_actor_count
from sentientedge.fleet import fly_fleet, percentile, watch

SENTIENTEDGE = str(Path(sys.executable).parent / "sentientedge")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRouter:
    def __init__(self, args: argparse.Namespace, extra_env: dict[str, str] | None = None) -> None:
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
                **(extra_env or {}),
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

    def api_key(self, drone_id: str) -> str:
        return auth.issue_api_key(self.api_key_secret, drone_id).key

    def token(self, role: str, sub: str) -> str:
        return auth.mint_jwt(self.jwt_secret, sub, role, 3600)


def _router_cpu(status: dict[str, Any]) -> dict[str, float]:
    cpu = {}
    for group in ("ingresses", "shards"):
        for name, info in status.get(group, {}).items():
            if "cpu_s" in info:
                cpu[name] = info["cpu_s"]
    return cpu


def _router_drops(status: dict[str, Any]) -> dict[str, int]:
    drops: dict[str, int] = {}
    for info in status.get("ingresses", {}).values():
        for reason, count in info.get("dropped", {}).items():
            drops[reason] = drops.get(reason, 0) + count
    lost = sum(info.get("lost_to_ingress", 0) for info in status.get("shards", {}).values())
    if lost:
        drops["shard_to_ingress_calls_failed"] = lost
    return drops


# Worker processes


def _run(coroutine: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _drones_process(
    url: str, keys: dict[str, str], rate: float, duration: float, qos: int, out: Any
) -> None:
    started = time.process_time()
    sent = _run(fly_fleet(url, keys, rate, duration, qos=qos))
    sent["_cpu_s"] = round(time.process_time() - started, 2)  # type: ignore[assignment]
    out.put(sent)


def _watch_process(url: str, token: str, topic_filter: str, ready: Any, out: Any) -> None:
    started = time.process_time()
    summary = _run(watch(url, token, topic_filter, ready=ready, idle_s=3.0))
    summary["cpu_s"] = round(time.process_time() - started, 2)
    out.put(summary)


def _hold_process(url: str, keys: list[str], hold: Any, out: Any) -> None:
    _run(_hold(url, keys, hold, out))


async def _hold(url: str, keys: list[str], hold: Any, out: Any) -> None:
    from sentientedge.client import Client

    semaphore = asyncio.Semaphore(100)
    clients: list[Client] = []
    failures: dict[str, int] = {}

    async def one(key: str) -> None:
        async with semaphore:
            try:
                clients.append(await Client.connect(url, api_key=key, open_timeout=60))
            except Exception as exc:
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1

    start = time.monotonic()
    await asyncio.gather(*(one(k) for k in keys))
    out.put(
        {"connected": len(clients), "failures": failures, "connect_s": time.monotonic() - start}
    )
    while not hold.is_set():
        await asyncio.sleep(0.2)
    alive = sum(1 for c in clients if not c.closed)
    await asyncio.gather(*(c.close() for c in clients))
    out.put({"alive_at_end": alive})


# Scenarios


def fan_in(args: argparse.Namespace) -> dict[str, Any]:
    return _fleet_into_one_subscriber(args, qos=0)


def qos1(args: argparse.Namespace) -> dict[str, Any]:
    """Drones publish QoS 1 events; each is stored before its puback and then delivered."""
    return _fleet_into_one_subscriber(args, qos=1)


def _fleet_into_one_subscriber(args: argparse.Namespace, qos: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    topic_filter = "drone/+/event" if qos else "drone/+/telemetry"
    with LocalRouter(args) as router:
        drone_ids = [f"bench-{i}" for i in range(args.drones)]
        results: Any = ctx.Queue()
        ready = ctx.Event()
        watcher = ctx.Process(
            target=_watch_process,
            args=(
                router.url,
                router.token("observer", "bench-station"),
                topic_filter,
                ready,
                results,
            ),
        )
        watcher.start()
        if not ready.wait(60):
            raise SystemExit("subscriber did not start")
        cpu_before = _router_cpu(router.status())
        groups = [drone_ids[i :: args.generators] for i in range(args.generators)]
        generators = [
            ctx.Process(
                target=_drones_process,
                args=(
                    router.url,
                    {d: router.api_key(d) for d in group},
                    args.rate,
                    args.duration,
                    qos,
                    results,
                ),
            )
            for group in groups
        ]
        wall = time.monotonic()
        for process in generators:
            process.start()
        outputs = [results.get(timeout=args.duration + 300) for _ in range(len(generators) + 1)]
        wall = time.monotonic() - wall
        final_status = router.status()
        cpu_after = _router_cpu(final_status)
        for process in (*generators, watcher):
            process.join(30)
    summary = next(o for o in outputs if "received" in o)
    sent_maps = [o for o in outputs if "received" not in o]
    offered = sum(v for m in sent_maps for k, v in m.items() if not k.startswith("_"))
    errors = sum(m.get("_errors", 0) for m in sent_maps)
    delivered = summary["received"]
    router_cpu = {k: round(cpu_after.get(k, 0) - v, 2) for k, v in cpu_before.items()}
    pubacks = sorted(s for m in sent_maps for s in m.get("_puback_s", []))
    durable: dict[str, Any] = {}
    if qos:
        durable = {
            "acknowledged": len(pubacks),
            "acknowledged_per_s": round(len(pubacks) / args.duration),
            "puback_ms": {
                "p50": round(percentile(pubacks, 0.5) * 1000, 2),
                "p99": round(percentile(pubacks, 0.99) * 1000, 2),
                "max": round((pubacks[-1] if pubacks else 0.0) * 1000, 2),
            },
            "duplicates_delivered": summary["duplicates"],
        }
    return {
        "scenario": "qos1" if qos else "fan-in",
        "drones": args.drones,
        "rate_hz": args.rate,
        "duration_s": args.duration,
        "ingress": args.ingress,
        "shards": args.shards,
        "offered": offered,
        "offered_per_s": round(offered / args.duration),
        "delivered": delivered,
        "delivered_per_s": round(delivered / args.duration),
        "loss": round(1 - delivered / offered, 6) if offered else None,
        "out_of_order": summary["out_of_order"],
        "errors_to_publishers": errors,
        "latency_ms": summary["latency_ms"],
        **durable,
        "router_drops": _router_drops(final_status),
        "cpu_s": {
            "router": router_cpu,
            "generators": [m.get("_cpu_s") for m in sent_maps],
            "subscriber": summary["cpu_s"],
            "wall_s": round(wall, 1),
        },
    }


def connections(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    extra = {"MAX_WS_CONNECTIONS": str(args.connections)}
    with LocalRouter(args, extra) as router:
        keys = [router.api_key(f"idle-{i}") for i in range(args.connections)]
        groups = [keys[i :: args.generators] for i in range(args.generators)]
        results: Any = ctx.Queue()
        hold = ctx.Event()
        holders = [
            ctx.Process(target=_hold_process, args=(router.url, g, hold, results)) for g in groups
        ]
        before = router.status()
        for process in holders:
            process.start()
        opened = [results.get(timeout=600) for _ in holders]
        time.sleep(args.hold)  # hold them idle: keepalive pings are the only traffic
        status = router.status()
        hold.set()
        closed = [results.get(timeout=300) for _ in holders]
        for process in holders:
            process.join(60)
    ingresses = status.get("ingresses", {})
    rss_before = sum(i.get("rss_bytes", 0) for i in before.get("ingresses", {}).values())
    rss_during = sum(i.get("rss_bytes", 0) for i in ingresses.values())
    held = sum(i.get("connections", 0) for i in ingresses.values())
    return {
        "scenario": "connections",
        "target": args.connections,
        "connected": sum(o["connected"] for o in opened),
        "held_by_router": held,
        "alive_after_hold": sum(c["alive_at_end"] for c in closed),
        "hold_s": args.hold,
        "connect_s": round(max(o["connect_s"] for o in opened), 1),
        "failures": [o["failures"] for o in opened if o["failures"]],
        "ingress_rss_mb": round(rss_during / 2**20, 1),
        "ingress_kb_per_connection": round((rss_during - rss_before) / max(held, 1) / 1024, 1),
        "ingress": args.ingress,
    }


SCENARIOS = {"fan-in": fan_in, "qos1": qos1, "connections": connections}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="fan-in")
    parser.add_argument("--drones", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--hold", type=float, default=10.0, help="seconds to hold idle connections")
    parser.add_argument("--ingress", type=int, default=default_actor_count())
    parser.add_argument("--shards", type=int, default=default_actor_count())
    parser.add_argument("--generators", type=int, default=1, help="load-generator processes")
    parser.add_argument("--address", help="Ray cluster to use (default: a local head)")
    args = parser.parse_args()
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    for name in names:
        print(json.dumps(SCENARIOS[name](args)), flush=True)


if __name__ == "__main__":
    main()
