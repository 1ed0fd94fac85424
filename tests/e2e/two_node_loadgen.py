"""Run by tests/e2e/test_loadgen.py in a process of its own: load workers spread over two Ray nodes.

A cluster of a head and one worker node on this machine with a router on it; a scenario of two
load workers run as Ray actors; prints one JSON line with where the workers ran and the results.
"""

from __future__ import annotations

import json
import sys

from actors.local_cluster import LocalCluster
from sentientedge.loadgen import Scenario, run


def main() -> None:
    stdout, sys.stdout = sys.stdout, sys.stderr  # Ray's own chatter stays off the result line
    with LocalCluster(workers=1, ingresses=1, shards=1) as cluster:
        scenario = Scenario(
            url=cluster.url,
            drones=8,
            rate_hz=10,
            duration_s=3,
            stations=1,
            workers=2,
            jwt_secret=cluster.jwt_secret,
            api_key_secret=cluster.api_key_secret,
        )
        results = run(scenario, on_ray=True, ray_address=cluster.address, progress=False)
    sys.stdout = stdout
    print(json.dumps({"nodes": results.worker_nodes, "summary": results.summary()}))


if __name__ == "__main__":
    main()
