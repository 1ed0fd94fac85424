"""A Ray cluster of several nodes on this machine, with a router on it: for tools and tests.

``ray.cluster_utils.Cluster`` starts a head and worker nodes as separate raylets on one machine,
so a node can be lost (``remove_node``) while the router keeps running on the others. The node
health check is tuned as ``sentientedge up`` tunes it. The router is started the way an operator
starts one, with ``sentientedge up --address``; this process joins the cluster as a driver.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

from actors import ray_api
from sentientedge.config import NODE_PORT_LABEL, Config
from sentientedge.embedded_redis import EmbeddedRedis

SENTIENTEDGE = str(Path(sys.executable).parent / "sentientedge")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    def __init__(
        self,
        workers: int = 2,
        ingresses: int = 2,
        shards: int = 2,
        node_ports: bool = False,
        **settings: str,
    ):
        """``node_ports``: each node serves on a port of its own (``sentientedge/port``), so a
        load balancer can tell them apart; ``node_ports[i]`` is node i's (0 is the head)."""
        self.workers = workers
        self.node_ports = [free_port() for _ in range(workers + 1)] if node_ports else []
        self.ingresses = ingresses
        self.shards = shards
        self.port = free_port()
        self.namespace = f"local-{uuid.uuid4().hex[:6]}"
        self.jwt_secret = uuid.uuid4().hex * 2
        self.api_key_secret = uuid.uuid4().hex * 2
        self.state_dir = tempfile.mkdtemp(prefix="se-cluster-")
        self.cluster: Cluster | None = None
        self.env = dict(os.environ)
        self.env.update(
            {
                "PORT": str(self.port),
                "RAY_NAMESPACE": self.namespace,
                "STATE_DIR": self.state_dir,
                "EMBEDDED_REDIS_PORT": str(free_port()),
                "JWT_SECRET": self.jwt_secret,
                "API_KEY_SECRET": self.api_key_secret,
                **settings,
            }
        )
        # The one `sentientedge up` starts (its password is in STATE_DIR).
        self.redis = EmbeddedRedis.for_config(Config.from_env(self.env))

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def address(self) -> str:
        assert self.cluster is not None
        return str(self.cluster.address)

    def start(self) -> LocalCluster:
        head_args = {
            "num_cpus": 2,
            "_system_config": ray_api.ROUTER_SYSTEM_CONFIG,
            **self._labels(0),
        }
        self.cluster = Cluster(initialize_head=True, head_node_args=head_args)
        for index in range(1, self.workers + 1):
            self.cluster.add_node(num_cpus=2, **self._labels(index))
        self.cluster.wait_for_nodes()
        self.cli(
            "up",
            "--address",
            self.address,
            "--ingress",
            str(self.ingresses),
            "--shards",
            str(self.shards),
        )
        ray.init(address=self.address, namespace=self.namespace, log_to_driver=False)
        return self

    def _labels(self, index: int) -> dict[str, Any]:
        if not self.node_ports:
            return {}
        return {"labels": {NODE_PORT_LABEL: str(self.node_ports[index])}}

    def stop(self) -> None:
        if self.cluster is not None:
            self.cli("down", "--address", self.address, check=False)
            ray.shutdown()
            self.cluster.shutdown()
            self.cluster = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cli(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [SENTIENTEDGE, *argv],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"sentientedge {argv[0]} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def status(self) -> dict[str, Any]:
        controller = ray_api.get_actor(ray_api.CONTROLLER, self.namespace)
        status: dict[str, Any] = ray_api.call_sync(controller, "status")
        return status

    def worker_nodes(self) -> list[Any]:
        assert self.cluster is not None
        return list(self.cluster.worker_nodes)

    def remove_node(self, node: Any) -> None:
        assert self.cluster is not None
        self.cluster.remove_node(node, allow_graceful=False)

    def add_node(self) -> None:
        assert self.cluster is not None
        self.cluster.add_node(num_cpus=2)
        self.cluster.wait_for_nodes()
