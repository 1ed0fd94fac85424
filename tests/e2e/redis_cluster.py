"""A Redis Cluster of 3 masters and 3 replicas (Debian's redis-server 7) on 127.0.0.1.

Each node is a redis-server of its own, with a password and an append-only file; the cluster
is formed with ``redis-cli --cluster create``. Node timeouts are short so that a killed master's
replica takes over within a few seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from functools import partial
from pathlib import Path

import redis

from tests.helpers import free_port, wait_until

PASSWORD = "cluster-test-password"
NODE_TIMEOUT_MS = 2000


class RedisCluster:
    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="se-rc-"))
        self.ports = [free_port() for _ in range(masters * (1 + replicas))]
        # The cluster bus port, set: port + 10000 (Redis's default) may be out of range.
        self.bus_ports = {port: free_port() for port in self.ports}
        self.replicas = replicas
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """Any one node: the router finds the others."""
        return f"redis://:{PASSWORD}@127.0.0.1:{self.ports[0]}/0"

    def start(self) -> RedisCluster:
        try:
            return self._form()
        except BaseException:
            self.stop()  # no node outlives a cluster that did not form
            raise

    def _form(self) -> RedisCluster:
        for port in self.ports:
            self._start_node(port)
        for port in self.ports:
            wait_until(partial(self._answers, port), 30, f"node {port}")
        result = subprocess.run(
            ["redis-cli", "-a", PASSWORD, "--no-auth-warning", "--cluster", "create",
             *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        wait_until(self.healthy, 30, "cluster_state:ok on every node")
        return self

    def _start_node(self, port: int) -> None:
        node = self.directory / str(port)
        node.mkdir(exist_ok=True)
        self.processes[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node),
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-port", str(self.bus_ports[port]),
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--appendonly", "yes",
             "--requirepass", PASSWORD, "--masterauth", PASSWORD, "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=port, password=PASSWORD, socket_timeout=2, decode_responses=True
        )

    def healthy(self) -> bool:
        """Every live node sees the cluster whole, and every replica is in sync with its
        master (until then, WAIT counts no replica)."""
        try:
            for port in self.alive():
                client = self.client(port)
                if client.cluster("info")["cluster_state"] != "ok":
                    return False
                replication = client.info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
            return True
        except redis.RedisError:
            return False

    def restart(self, port: int) -> None:
        """A node killed earlier starts again with its data: a failed-over master comes back
        as a replica of the node that took its place."""
        self._start_node(port)
        wait_until(self.healthy, 30, f"node {port} back in the cluster")

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot now, as a live node reports it."""
        slot = self.client(self.alive()[0]).cluster("keyslot", key)
        for low, high, master, *_ in self.client(self.alive()[0]).execute_command("CLUSTER SLOTS"):
            if low <= slot <= high:
                return int(master[1])
        raise LookupError(slot)

    def replicas_of(self, port: int) -> int:
        info = self.client(port).info("replication")
        return int(info.get("connected_slaves", 0))

    def alive(self) -> list[int]:
        return [p for p, proc in self.processes.items() if proc.poll() is None]

    def kill(self, port: int) -> None:
        process = self.processes[port]
        process.kill()
        process.wait(10)

    def _answers(self, port: int) -> bool:
        try:
            return bool(self.client(port).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)
