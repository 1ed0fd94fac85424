"""Chaos on a local multi-node cluster: kill router parts under load, measure what it costs.

    scripts/chaos                                   # 20 failures of every kind, ~3 minutes
    scripts/chaos --kinds node --failures 1         # one node loss
    scripts/chaos --kinds shard,ingress --failures 10 --seed 7

A Ray cluster of a head and ``--workers`` worker nodes on this machine (``ray.cluster_utils``),
with the node health check tuned as ``sentientedge up`` tunes it; a router of 2 ingresses and
2 shards on it with an embedded Redis. Load: drones streaming QoS 0 telemetry, an operator
publishing QoS 1 messages on several topics (retrying with the same id what is not
acknowledged), a station receiving both; all clients reconnect and resume by themselves.

Failures, at random intervals: ``shard`` (SIGKILL of a shard process), ``ingress`` (SIGKILL of
an ingress process), ``node`` (a worker node's raylet and every process on it killed; a fresh
node joins afterwards), ``redis`` (SIGKILL, restarted from its append-only file).

Prints one JSON line: QoS 1 messages acknowledged, lost (must be 0) and duplicated (delivered
again, flagged dup, to the client library, which does not hand them to the application twice);
and per kind of failure the time until service returned (every topic acknowledges a message
published after the failure; p50 and max) and the longest QoS 0 silence at the station.
All traffic goes to 127.0.0.1, bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from collections import defaultdict
from typing import Any

from actors.local_cluster import LocalCluster
from sentientedge import auth
from sentientedge.client import Client
from sentientedge.errors import ServerError
from sentientedge.fleet import fly, percentile

SERVICE_TIMEOUT_S = 60.0


class Harness(LocalCluster):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(
            workers=args.workers,
            RATE_LIMIT_MAX="600000",
            HANDSHAKE_RATE="1000000",
            MAX_BYTES_PER_S="1000000000",
        )
        self.args = args
        self.rng = random.Random(args.seed)

    # Failures

    def fail(self, kind: str) -> str:
        status = self.status()
        if kind == "shard":
            name, info = self.rng.choice(sorted(status["shards"].items()))
            os.kill(info["pid"], signal.SIGKILL)
            return name
        if kind == "ingress":
            name, info = self.rng.choice(sorted(status["ingresses"].items()))
            os.kill(info["pid"], signal.SIGKILL)
            return name
        if kind == "redis":
            os.kill(int(self.redis.pidfile.read_text()), signal.SIGKILL)
            time.sleep(1.0)  # down for a second, then back from its append-only file
            self.redis.start()
            return "redis"
        return self._fail_node(status)

    def after(self, kind: str) -> None:
        """Capacity comes back after a node loss, as an autoscaler would bring it."""
        if kind == "node":
            self.add_node()

    def _fail_node(self, status: dict[str, Any]) -> str:
        held: defaultdict[str, list[str]] = defaultdict(list)
        for group in ("shards", "ingresses"):
            for name, info in status[group].items():
                held[info.get("node", "")].append(name)
        candidates = [n for n in self.worker_nodes() if held.get(n.node_id)]
        victim = self.rng.choice(candidates or self.worker_nodes())
        self.remove_node(victim)
        return f"node {','.join(held.get(victim.node_id, [])) or '-'}"


class Load:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.s = settings
        self.topics = [f"fleet/chaos/t{i}" for i in range(settings["topics"])]
        self.acked: dict[int, float] = {}  # n -> acked at
        self.sent_at: dict[int, tuple[str, float]] = {}  # n -> (topic, first sent at)
        self.received: defaultdict[int, int] = defaultdict(int)
        self.qos0_times: list[float] = []
        self.stop = asyncio.Event()

    async def start(self) -> None:
        s = self.s
        station_token = auth.mint_jwt(s["jwt_secret"], "chaos-station", "observer", 3600)
        self.station = await Client.connect(s["url"], token=station_token, reconnect=True)
        await self.station.subscribe("fleet/chaos/#", "drone/+/telemetry")
        op_token = auth.mint_jwt(s["jwt_secret"], "chaos-operator", "operator", 3600)
        self.operator = await Client.connect(s["url"], token=op_token, reconnect=True)
        self.drones = [
            await Client.connect(
                s["url"],
                api_key=auth.issue_api_key(s["api_key_secret"], f"chaos-{i}").key,
                reconnect=True,
            )
            for i in range(s["drones"])
        ]
        self.tasks = [
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._publish()),
            *(
                asyncio.create_task(fly(d, f"chaos-{i}", s["rate"], None, stop=self.stop))
                for i, d in enumerate(self.drones)
            ),
        ]

    async def _receive(self) -> None:
        while True:
            message = await self.station.recv()
            if message.qos == 1:
                self.received[message.data["n"]] += 1
            elif not message.retained:
                self.qos0_times.append(time.monotonic())

    async def _publish(self) -> None:
        n = 0
        while not self.stop.is_set():
            topic = self.topics[n % len(self.topics)]
            self.sent_at[n] = (topic, time.monotonic())
            while True:
                try:
                    await self.operator.publish(topic, {"n": n}, qos=1, id=f"c{n}", timeout=120)
                    break
                except (ServerError, asyncio.TimeoutError):
                    await asyncio.sleep(0.05)  # nothing stored: the same id again
            self.acked[n] = time.monotonic()
            n += 1
            await asyncio.sleep(1 / self.s["qos1_rate"])

    async def service_returned(self, since: float) -> float:
        """Seconds from ``since`` until every topic acknowledged a message published after it."""
        deadline = since + SERVICE_TIMEOUT_S
        while time.monotonic() < deadline:
            done = {self.sent_at[n][0] for n in list(self.acked) if self.sent_at[n][1] >= since}
            if done >= set(self.topics):
                first_ack: dict[str, float] = {}
                for n, at in self.acked.items():
                    topic, sent = self.sent_at[n]
                    if sent >= since:
                        first_ack[topic] = min(at, first_ack.get(topic, at))
                return max(first_ack.values()) - since
            await asyncio.sleep(0.05)
        return float("inf")

    def qos0_gap(self, since: float, until: float) -> float:
        times = [t for t in self.qos0_times if since - 1 <= t <= until]
        if len(times) < 2:
            return until - since
        return max(b - a for a, b in itertools.pairwise(times))

    async def finish(self) -> dict[str, int]:
        self.stop.set()
        await asyncio.gather(*self.tasks[1:], return_exceptions=True)
        deadline = time.monotonic() + 60
        while set(self.acked) - set(self.received) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        self.tasks[0].cancel()
        for client in (self.station, self.operator, *self.drones):
            await client.close()
        lost = len(set(self.acked) - set(self.received))
        duplicated = sum(count - 1 for count in self.received.values() if count > 1)
        return {"acked": len(self.acked), "lost": lost, "duplicated_to_client": duplicated}


def _load_process(settings: dict[str, Any], inbox: Any, outbox: Any) -> None:
    """The load, in a process of its own: the harness's blocking calls (adding a node) must not
    stall the clients whose experience is being measured."""

    async def serve() -> None:
        load = Load(settings)
        await load.start()
        outbox.put(("ready",))
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, inbox.get)
            if command[0] == "finish":
                outbox.put(("done", await load.finish()))
                return
            since = command[1]
            returned = await load.service_returned(since)
            await asyncio.sleep(1.0)
            outbox.put(("measured", returned, load.qos0_gap(since, time.monotonic())))

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())


def run(h: Harness) -> dict[str, Any]:
    args = h.args
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    settings = {
        "url": h.url,
        "jwt_secret": h.jwt_secret,
        "api_key_secret": h.api_key_secret,
        "drones": args.drones,
        "rate": args.rate,
        "qos1_rate": args.qos1_rate,
        "topics": args.topics,
    }
    process = ctx.Process(target=_load_process, args=(settings, inbox, outbox))
    process.start()
    assert outbox.get(timeout=120)[0] == "ready"
    time.sleep(args.warmup)
    kinds = args.kinds.split(",")
    outcomes: defaultdict[str, list[tuple[float, float]]] = defaultdict(list)
    for index in range(args.failures):
        kind = kinds[index % len(kinds)]
        since = time.monotonic()
        victim = h.fail(kind)
        inbox.put(("measure", since))
        _, returned, gap = outbox.get(timeout=SERVICE_TIMEOUT_S + 30)
        outcomes[kind].append((returned, gap))
        print(
            f"{kind:8} {victim:24} served again after {returned:6.2f} s, qos0 gap {gap:5.2f} s",
            file=sys.stderr,
            flush=True,
        )
        h.after(kind)
        time.sleep(h.rng.uniform(args.min_interval, args.max_interval))
    inbox.put(("finish",))
    _, qos1 = outbox.get(timeout=180)
    process.join(30)

    def summary(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {"p50": round(percentile(ordered, 0.5), 2), "max": round(ordered[-1], 2)}

    return {
        "failures": args.failures,
        "qos1": qos1,
        "by_kind": {
            kind: {
                "count": len(values),
                "service_returned_s": summary([r for r, _ in values]),
                "qos0_gap_s": summary([g for _, g in values]),
            }
            for kind, values in outcomes.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="shard,ingress,node,redis")
    parser.add_argument("--failures", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="worker nodes besides the head")
    parser.add_argument("--drones", type=int, default=20)
    parser.add_argument("--rate", type=float, default=20.0, help="telemetry Hz per drone")
    parser.add_argument("--qos1-rate", type=float, default=100.0, help="QoS 1 messages a second")
    parser.add_argument("--topics", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--min-interval", type=float, default=2.0)
    parser.add_argument("--max-interval", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    harness = Harness(args)
    stdout = sys.stdout
    sys.stdout = sys.stderr  # Ray prints its nodes' deaths to stdout: keep it for the result
    try:
        harness.start()
        result = run(harness)
    finally:
        harness.stop()
        sys.stdout = stdout
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
