"""cluster.yaml run on Ray's fake multi-node provider: the head's commands, the router serving,
Ray's autoscaler adding a node under load and the node serving, then everything stopped.

The run (tests/e2e/fake_cluster_peer.py) gets its own PID and mount namespaces and a private
/tmp: its Ray head cannot meet the session's cluster, and whatever it started ends with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import REPO

ISOLATED = [
    "unshare",
    "--pid",
    "--fork",
    "--mount-proc",
    "--mount",
    "--propagation",
    "private",
    "bash",
    "-c",
    'mount -t tmpfs -o size=4g tmpfs /tmp && exec "$0" -m tests.e2e.fake_cluster_peer',
    sys.executable,
]


def test_cluster_yaml_on_the_fake_multinode_provider_grows_under_load():
    argv = ISOLATED if os.geteuid() == 0 else ["sudo", "-n", *ISOLATED]
    result = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # The head alone at first, the router on it at its minimum, routing.
    assert report["nodes_at_start"] == 1 and report["instances_at_start"] == 2
    assert report["routed"]
    # Load crossed the threshold: one step up; Ray's autoscaler added a node; the node got
    # the new shard and an ingress, and the ingress took clients.
    assert report["scaling_events"] == [["up", 2, 3, "done"]]
    assert report["nodes"] == 2 and report["instances"] == 3
    added = report["added_node"]
    assert added["ingresses"] and added["connections"] > 0
    assert report["routed_after"]
    # `sentientedge down` and `ray stop` left no raylet running.
    assert report["down"]
