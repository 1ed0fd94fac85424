"""SentientEdge benchmarks: named scenarios of sentientedge.loadgen against a fresh local router.

    scripts/bench                                   # fan-in: 200 drones x 50 Hz -> 1 station
    scripts/bench --scenario light                  # 20 drones x 10 Hz: latency with no load
    scripts/bench --scenario max-fan-in             # 600 drones x 50 Hz = 30,000 msgs/s
    scripts/bench --scenario fan-out                # 100 drones x 50 Hz -> 10 stations
    scripts/bench --scenario qos1                   # 300 drones, every message stored first
    scripts/bench --scenario churn                  # 10% of links dropping, commands on top
    scripts/bench --scenario reshard --ingress 2 --shards 2   # fan-in while 2 -> 4 -> 2 live
    scripts/bench --scenario connections            # 10,000 idle connections on one node
    scripts/bench --scenario links                  # fan-in on 1+1, then 2+2 ingress+shards
    scripts/bench --scenario all
    scripts/bench --drones 300 --rate 50 --duration 20     # override a scenario's numbers

Each scenario starts its own router with ``sentientedge up`` (a local Ray head and an embedded
Redis unless ``--address`` says otherwise), runs, stops it, and prints one JSON line: the
loadgen summary, the CPU of every router process (each ingress and shard, the controller,
Redis, Ray's own) and of the load generator, and the router's drops. CPU is reported twice:
``cpu_s`` over the whole run (connecting included), ``cores`` while the fleet flies (from 1 s
after the start to 0.5 s before the end): the steady state the figures are about. The load
runs in this process (a thread of its own) unless ``--on-ray``, where it runs as Ray actors.
All traffic goes to 127.0.0.1. ``links`` runs fan-in twice, on 1 ingress + 1 shard and on
2 + 2 (``--ingress``/``--shards`` do not apply to it), and reports both p99s and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sentientedge.cli import default_actor_count
from sentientedge.loadgen import LoadRun, Results, Scenario

SENTIENTEDGE = str(Path(sys.executable).parent / "sentientedge")

FAN_IN = {"drones": 200, "rate_hz": 50, "stations": 1, "duration_s": 15}
SCENARIOS: dict[str, dict[str, Any]] = {
    "light": {"drones": 20, "rate_hz": 10, "stations": 1, "duration_s": 15},
    "fan-in": FAN_IN,
    "fan-in-400": {**FAN_IN, "drones": 400},
    "max-fan-in": {**FAN_IN, "drones": 600},
    "fan-out": {"drones": 100, "rate_hz": 50, "stations": 10, "duration_s": 15},
    "qos1": {"drones": 300, "rate_hz": 50, "stations": 1, "duration_s": 15, "telemetry_qos": 1},
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
    # Fan-in while the router grows by 2 instances and shrinks back (RESHARD_AT).
    "reshard": {**FAN_IN, "drones": 100, "duration_s": 40},
}
# Seconds into the reshard scenario: scale up by 2, then down by 2.
RESHARD_AT = ((8.0, "up"), (24.0, "down"))
# Fan-in through more links: the same load on 1 ingress + 1 shard, then on 2 + 2.
LINKS = ((1, 1), (2, 2))
NAMES = [*SCENARIOS, "links"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRouter:
    def __init__(
        self, args: argparse.Namespace, ingress: int, shards: int, extra_env: dict[str, str]
    ) -> None:
        self.port = free_port()
        self.redis_port = free_port()
        self.jwt_secret = uuid.uuid4().hex * 2
        self.api_key_secret = uuid.uuid4().hex * 2
        self.args = args
        self.ingress = ingress
        self.shards = shards
        self.processes: dict[int, str] = {}  # pid -> what it is, for every router process
        self.env = dict(os.environ)
        self.env.update(
            {
                "PORT": str(self.port),
                "RAY_NAMESPACE": f"bench-{uuid.uuid4().hex[:6]}",
                "STATE_DIR": tempfile.mkdtemp(prefix="se-bench-"),
                "EMBEDDED_REDIS_PORT": str(self.redis_port),
                "JWT_SECRET": self.jwt_secret,
                "API_KEY_SECRET": self.api_key_secret,
                "RATE_LIMIT_MAX": "600000",
                # The load generator is one address opening thousands of connections.
                "HANDSHAKE_RATE": "1000000",
                "MAX_BYTES_PER_S": "1000000000",
                "AUTOSCALE": "false",  # a benchmark measures the shape it asked for
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
        before = set(_all_processes())
        result = self._cli("up", "--ingress", str(self.ingress), "--shards", str(self.shards))
        if result.returncode != 0:
            raise SystemExit(f"sentientedge up failed:\n{result.stdout}\n{result.stderr}")
        # What `up` started (Ray's head if none ran, the actors, Redis) is the router. On a
        # machine that runs nothing else meanwhile; actors are named from their own status.
        self.processes = {
            pid: label for pid, label in _all_processes().items() if pid not in before
        }
        return self

    def __exit__(self, *exc: object) -> None:
        self._cli("down")

    def status(self) -> dict[str, Any]:
        result = self._cli("status", "--json")
        return json.loads(result.stdout) if result.returncode == 0 else {}

    def name_actors(self, status: dict[str, Any]) -> None:
        for group in ("ingresses", "shards"):
            for name, info in status.get(group, {}).items():
                if "pid" in info:
                    self.processes[int(info["pid"])] = name


def _all_processes() -> dict[int, str]:
    """Every process on this machine, labelled: ``ray::Ingress``, ``raylet``, ``redis``, ..."""
    try:
        import psutil  # comes with ray[default]
    except ImportError:  # pragma: no cover
        return {}
    found: dict[int, str] = {}
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        name = process.info["name"] or ""
        if cmdline and cmdline[0].startswith("ray::"):
            label = cmdline[0].split()[0].split(".")[0]  # the actor class, not the method
        elif name.startswith("redis-server"):
            label = "redis"
        elif name in ("raylet", "gcs_server"):
            label = name
        else:
            label = "ray-other" if any("ray" in part for part in cmdline[:3]) else name
        found[process.pid] = label
    return found


def _cpu_seconds(pids: dict[int, str]) -> dict[str, float]:
    """CPU (user + system) each labelled process has used so far; same labels add up."""
    import psutil

    out: dict[str, float] = {}
    for pid, label in pids.items():
        try:
            times = psutil.Process(pid).cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out[label] = out.get(label, 0.0) + times.user + times.system
    return out


def _drops(status: dict[str, Any]) -> dict[str, int]:
    drops: dict[str, int] = {}
    for info in status.get("ingresses", {}).values():
        for reason, count in info.get("dropped", {}).items():
            drops[reason] = drops.get(reason, 0) + count
    return drops


def _archived(status: dict[str, Any]) -> dict[str, int]:
    """What the shards' archivers wrote, dropped and still hold (``--archive``)."""
    totals: dict[str, int] = {}
    for info in status.get("shards", {}).values():
        for name, value in (info.get("archive") or {}).items():
            if isinstance(value, int) and not isinstance(value, bool):
                totals[name] = totals.get(name, 0) + value
    return totals


def _ingress_memory(status: dict[str, Any]) -> tuple[float, int]:
    ingresses = status.get("ingresses", {}).values()
    rss_mb = sum(info.get("rss_bytes", 0) for info in ingresses) / 2**20
    return rss_mb, sum(info.get("connections", 0) for info in ingresses)


class Rescaler(threading.Thread):
    """Scales the router up and back down while the fleet flies; keeps how long each took."""

    def __init__(self, load: LoadRun, router: LocalRouter) -> None:
        super().__init__(daemon=True)
        self.load = load
        self.router = router
        self.took: dict[str, str] = {}

    def run(self) -> None:
        start = self.load.plans[0].started_at
        for at, direction in RESHARD_AT:
            time.sleep(max(0.0, start + at - time.time()))
            result = self.router._cli("scale", direction, "2")
            lines = (result.stdout + result.stderr).strip().splitlines()
            self.took[direction] = lines[-1] if lines else f"exit {result.returncode}"


class Sampler(threading.Thread):
    """CPU of the load generator and of every router process while the fleet flies."""

    def __init__(self, load: LoadRun, router: LocalRouter, duration_s: float) -> None:
        super().__init__(daemon=True)
        self.load = load
        self.router = router
        start = load.plans[0].started_at
        self.window = (start + min(1.0, duration_s / 4), start + duration_s - 0.5)
        self.marks: list[tuple[float, float, dict[str, Any], dict[str, float]]] = []

    def run(self) -> None:
        for at in self.window:
            time.sleep(max(0.0, at - time.time()))
            self.marks.append(
                (
                    time.time(),
                    time.process_time(),
                    self.load.progress(),
                    _cpu_seconds(self.router.processes),
                )
            )

    def report(self, on_ray: bool) -> dict[str, Any]:
        if len(self.marks) < 2:
            return {}
        (t0, cpu0, progress0, router0), (t1, cpu1, progress1, router1) = self.marks
        wall = max(t1 - t0, 1e-6)
        messages = (progress1["sent"] - progress0["sent"]) + (
            progress1["delivered"] - progress0["delivered"]
        )
        out: dict[str, Any] = {
            "router": {k: round((v - router0.get(k, 0.0)) / wall, 3) for k, v in router1.items()}
        }
        if not on_ray:
            out["loadgen"] = round((cpu1 - cpu0) / wall, 3)
            # Per message sent or received: a fan-in message costs one of each.
            out["loadgen_us_per_msg"] = round((cpu1 - cpu0) * 1e6 / max(messages, 1), 2)
        return out


def _stores(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[dict[str, str], Any]:
    """``--archive``: a PostgreSQL behind PgBouncer for the flight history; ``--redis-cluster``:
    a 3-master, 3-replica Redis Cluster instead of the embedded Redis (both Debian's, started
    as the tests start them, stopped after the run). Returns the router's settings for them,
    and the PostgreSQL (for ``--archive-outage``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    env: dict[str, str] = {}
    postgres = None
    if args.archive:
        from tests.e2e.postgres import Postgres

        postgres = Postgres().start()
        stack.callback(postgres.stop)
        env["DATABASE_URL"] = postgres.url
    if args.redis_cluster:
        from tests.e2e.redis_cluster import RedisCluster

        cluster = RedisCluster().start()
        stack.callback(cluster.stop)
        env["REDIS_URL"] = cluster.url
        env["REDIS_WAIT_REPLICAS"] = "1" if args.redis_cluster == "wait" else "0"
    return env, postgres


def _outage(postgres: Any, seconds: float) -> None:
    postgres.stop_server()
    time.sleep(seconds)
    postgres.start_server()


class Balancer:
    """HAProxy or NGINX (Debian's) in front of the router, on what ``sentientedge lb`` writes:
    ``--via`` measures what the balancer adds. NGINX terminates TLS (a self-signed certificate
    the load generator trusts through ``SSL_CERT_FILE``), as it is deployed."""

    def __init__(self, kind: str, router: LocalRouter) -> None:
        self.kind = kind
        self.router = router
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix=f"se-bench-{kind}-"))
        self.directory.chmod(0o755)  # NGINX's workers run as another user
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "wss" if self.kind == "nginx" else "ws"
        return f"{scheme}://127.0.0.1:{self.port}/ws"

    def __enter__(self) -> Balancer:
        from sentientedge.tls import self_signed

        config = self.directory / f"{self.kind}.conf"
        options = ["--out", str(config), "--bind", f"127.0.0.1:{self.port}"]
        if self.kind == "haproxy":
            options += ["--stats", f"127.0.0.1:{free_port()}"]
            options += ["--socket", str(self.directory / "haproxy.sock")]
            command = ["haproxy", "-db", "-f", str(config)]
        else:
            cert, key, _ = self_signed(self.directory / "tls")
            os.environ["SSL_CERT_FILE"] = str(cert)
            options += ["--cert", str(cert), "--key", str(key), "--prefix", str(self.directory)]
            options += ["--pid", str(self.directory / "nginx.pid")]
            command = ["nginx", "-p", str(self.directory), "-c", str(config), "-g", "daemon off;"]
        result = self.router._cli("lb", self.kind, *options)
        if result.returncode != 0:
            raise SystemExit(f"sentientedge lb {self.kind} failed:\n{result.stderr}")
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 30
        while not _health_through(self.port, self.kind == "nginx"):
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.kind} did not pass /health through within 30 s")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, 15)
            self.process.wait(20)


def _health_through(port: int, tls: bool) -> bool:
    import ssl
    import urllib.request

    scheme = "https" if tls else "http"
    try:
        with urllib.request.urlopen(
            f"{scheme}://127.0.0.1:{port}/health", timeout=2, context=ssl.create_default_context()
        ) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def bench(
    name: str, args: argparse.Namespace, ingress: int | None = None, shards: int | None = None
) -> dict[str, Any]:
    shape = dict(SCENARIOS[name])
    for option, key in (("drones", "drones"), ("rate", "rate_hz"), ("duration", "duration_s")):
        if getattr(args, option) is not None:
            shape[key] = getattr(args, option)
    ingress = args.ingress if ingress is None else ingress
    shards = args.shards if shards is None else shards
    extra_env = {"MAX_WS_CONNECTIONS": str(shape["drones"] + 100)}
    if name == "reshard":
        extra_env |= {"MIN_INSTANCES": "1", "MAX_INSTANCES": str(shards + 2)}
    with contextlib.ExitStack() as stack:
        stores, postgres = _stores(args, stack)
        extra_env |= stores
        router = stack.enter_context(LocalRouter(args, ingress, shards, extra_env))
        url = router.url
        if args.via:
            url = stack.enter_context(Balancer(args.via, router)).url
        scenario = Scenario(
            url=url,
            jwt_secret=router.jwt_secret,
            api_key_secret=router.api_key_secret,
            workers=args.workers,
            **shape,
        )
        status = router.status()
        router.name_actors(status)
        before = _cpu_seconds(router.processes)
        cpu = time.process_time()
        load = LoadRun(scenario, on_ray=args.on_ray)
        if args.archive_outage and postgres is not None:  # stopped a third into the load
            pause = (postgres, args.archive_outage)
            outage = threading.Timer(scenario.duration_s / 3, _outage, pause)
            outage.start()
            stack.callback(outage.join)
        sampler = Sampler(load, router, scenario.duration_s)
        sampler.start()
        rescaler = Rescaler(load, router) if name == "reshard" else None
        if rescaler is not None:
            rescaler.start()
        during: dict[str, Any] = {}
        if name == "connections":  # what the router holds while the fleet is connected
            time.sleep(max(0.0, load.plans[0].started_at - time.time()) + scenario.duration_s / 2)
            during = router.status()
        results = load.wait(progress=not args.quiet)
        loadgen_cpu = time.process_time() - cpu
        after = _cpu_seconds(router.processes)
        sampler.join(5)
        final = router.status()
        drops = _drops(final)
        archived = _archived(final) if args.archive else {}
        if rescaler is not None:
            rescaler.join(120)
    return _report(name, ingress, shards, results, drops, loadgen_cpu, args, before, after) | {
        "cores": sampler.report(args.on_ray),
        **_connections(status, during),
        **({"rescaled": rescaler.took} if rescaler is not None else {}),
        **({"archived": archived} if archived else {}),
    }


def _report(
    name: str,
    ingress: int,
    shards: int,
    results: Results,
    drops: dict[str, int],
    loadgen_cpu: float,
    args: argparse.Namespace,
    before: dict[str, float],
    after: dict[str, float],
) -> dict[str, Any]:
    report: dict[str, Any] = {"scenario": name, "ingress": ingress, "shards": shards}
    report.update(results.summary())
    report["router_drops"] = drops
    report["cpu_s"] = {
        "router": {k: round(v - before.get(k, 0.0), 2) for k, v in sorted(after.items())},
        "loadgen": round(loadgen_cpu, 2) if not args.on_ray else None,
    }
    if not args.on_ray:  # the most this process held (10,000 links: what each one costs)
        report["loadgen_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return report


def _connections(before: dict[str, Any], during: dict[str, Any]) -> dict[str, Any]:
    if not during:
        return {}
    rss_before, _ = _ingress_memory(before)
    rss, held = _ingress_memory(during)
    return {
        "connections_held": held,
        "ingress_rss_mb": round(rss, 1),
        "ingress_kb_per_connection": round((rss - rss_before) * 1024 / max(held, 1), 1),
    }


def links(args: argparse.Namespace) -> dict[str, Any]:
    """Fan-in on 1 ingress + 1 shard, then on 2 + 2: what more Ray links cost in latency."""
    runs = [bench("fan-in", args, ingress, shards) for ingress, shards in LINKS]
    p99 = [run["latency_ms"]["p99"] for run in runs]
    return {
        "scenario": "links",
        "p99_ms": {f"{i}+{s}": value for (i, s), value in zip(LINKS, p99, strict=True)},
        "p99_ratio": round(p99[1] / p99[0], 2) if p99[0] else None,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=[*NAMES, "all"], default="fan-in")
    parser.add_argument("--drones", type=int)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--duration", type=float)
    parser.add_argument("--ingress", type=int, default=default_actor_count())
    parser.add_argument("--shards", type=int, default=default_actor_count())
    parser.add_argument("--workers", type=int, default=1, help="load-generator workers")
    parser.add_argument("--on-ray", action="store_true", help="load workers as Ray actors")
    parser.add_argument("--address", help="Ray cluster to use (default: a local head)")
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="Ray nodes to run on this machine (raylets of one cluster; every node serves)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--via", choices=["haproxy", "nginx"], help="load through this balancer (Debian's)"
    )
    parser.add_argument("--archive", action="store_true", help="archive into PostgreSQL")
    parser.add_argument(
        "--archive-outage", type=float, default=0, help="with --archive: PostgreSQL down S s"
    )
    parser.add_argument(
        "--redis-cluster",
        choices=["wait", "nowait"],
        help="a Redis Cluster instead of the embedded Redis; QoS 1 with or without WAIT",
    )
    args = parser.parse_args()
    names = NAMES if args.scenario == "all" else [args.scenario]
    cluster = _local_nodes(args) if args.nodes > 1 and not args.address else None
    try:
        for name in names:
            report = links(args) if name == "links" else bench(name, args)
            options = {"via": args.via, "archive": args.archive, "redis": args.redis_cluster}
            print(json.dumps({**report, "nodes": args.nodes, **options}), flush=True)
    finally:
        if cluster is not None:
            cluster.shutdown()


def _local_nodes(args: argparse.Namespace) -> Any:
    """A cluster of ``--nodes`` raylets on this machine; the router runs on all of them."""
    from ray.cluster_utils import Cluster

    from actors.ray_api import ROUTER_SYSTEM_CONFIG

    head = {"num_cpus": 2, "_system_config": ROUTER_SYSTEM_CONFIG}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    args.address = cluster.address
    return cluster


if __name__ == "__main__":
    main()
