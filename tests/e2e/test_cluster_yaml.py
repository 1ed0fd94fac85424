"""cluster.yaml passes Ray's own validation, and starts the router on the head."""

from __future__ import annotations

import copy
import json

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.helpers import REPO


def _load() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_for_ray_up():
    config = prepare_config(copy.deepcopy(_load()))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    assert any(t != config["head_node_type"] for t in config["available_node_types"])


def test_cluster_yaml_installs_the_project_and_starts_the_router():
    config = _load()
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])
    assert any("sentientedge up --address auto" in c for c in config["head_start_ray_commands"])


def test_cluster_yaml_configures_ray_as_sentientedge_up_does():
    """Lost nodes noticed in about 2 s, and the router's processes at normal priority."""
    from actors.ray_api import ROUTER_SYSTEM_CONFIG

    [start] = [c for c in _load()["head_start_ray_commands"] if "ray start --head" in c]
    system_config = json.loads(start.split("--system-config=")[1].strip().strip("'"))
    assert system_config == ROUTER_SYSTEM_CONFIG


def test_cluster_yaml_is_locked_and_sized_by_the_instance_bounds():
    """Token authentication on every node, the dashboard on loopback, the embedded Redis
    reachable by every node (with its password), workers between MIN and MAX_INSTANCES."""
    from sentientedge.config import Config

    config = _load()
    head = config["head_start_ray_commands"]
    workers = config["worker_start_ray_commands"]
    [start] = [c for c in head if "ray start --head" in c]
    assert "RAY_AUTH_MODE=token" in start and "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in start
    assert all("RAY_AUTH_MODE=token" in c for c in workers if "ray start" in c)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    [up] = [c for c in head if "sentientedge up" in c]
    assert "RAY_AUTH_MODE=token" in up and "EMBEDDED_REDIS_HOST=0.0.0.0" in up
    defaults = Config()
    worker = config["available_node_types"]["worker"]
    assert (worker["min_workers"], worker["max_workers"]) == (
        defaults.min_instances,
        defaults.max_instances,
    )
    assert config["max_workers"] == defaults.max_instances
