"""Imports go one way (DESIGN.md, "Layers"): the pure core needs neither Ray nor sockets, the
library never reaches into the actors, and no actor class imports another."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

# The pure core: logic fed and drained, tested in milliseconds.
PURE = {
    "admins",
    "archive",
    "auth",
    "autoscale",
    "codec",
    "config",
    "delivery",
    "errors",
    "failover",
    "forwarded",
    "keepalive",
    "mavlink",
    "metrics",
    "placement",
    "protocol",
    "ratelimit",
    "records",
    "ring",
    "routing",
    "sealing",
    "topics",
    "virtual",
    "wire",
    "wsframes",
}
# C helpers of I/O libraries that do no I/O themselves.
PURE_HELPERS = {"websockets.speedups", "websockets.speedups.apply_mask"}
# What opens sockets, runs event loops or talks to Redis: not for the pure core.
IO = {
    "asyncio", "socket", "ssl", "ray", "redis", "websockets", "uvloop", "subprocess", "psycopg",
    "psycopg_pool",
}  # fmt: skip
# Modules of the library that start the router and so may reach the actors (imported late).
COMPOSITION_ROOTS = {"sentientedge/cli.py", "sentientedge/loadgen.py"}
ACTOR_CLASSES = {"controller", "ingress", "topic_shard", "load_worker", "mavlink_bridge"}


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def top(module: str) -> str:
    return module.split(".")[0]


LIBRARY = sorted((REPO / "sentientedge").rglob("*.py"))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(REPO)))
def test_the_library_needs_no_ray_and_reaches_no_actor(path: Path):
    imported = imports_of(path)
    assert "ray" not in {top(m) for m in imported}
    if str(path.relative_to(REPO)) not in COMPOSITION_ROOTS:
        assert "actors" not in {top(m) for m in imported}


@pytest.mark.parametrize("name", sorted(PURE))
def test_the_pure_core_does_no_io(name: str):
    imported = imports_of(REPO / "sentientedge" / f"{name}.py") - PURE_HELPERS
    assert not {top(m) for m in imported} & IO
    library = {m.split(".")[1] for m in imported if top(m) == "sentientedge" and "." in m}
    assert library <= PURE, f"{name} imports the I/O modules {sorted(library - PURE)}"


@pytest.mark.parametrize("name", sorted(ACTOR_CLASSES))
def test_no_actor_class_imports_another(name: str):
    imported = imports_of(REPO / "actors" / f"{name}.py")
    others = {f"actors.{other}" for other in ACTOR_CLASSES - {name}}
    assert not imported & others


def test_ray_api_creates_actors_from_classes_passed_in():
    imported = imports_of(REPO / "actors" / "ray_api.py")
    assert not imported & {f"actors.{name}" for name in ACTOR_CLASSES}
