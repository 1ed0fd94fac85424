"""Test lanes: ``tests/unit`` (no Ray, no sockets: seconds) and ``tests/e2e`` (real Ray, Redis
and sockets). Each test is marked with its lane, so ``scripts/test -m unit`` runs the fast one."""

from __future__ import annotations

from pathlib import Path

import pytest

LANES = ("unit", "e2e")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: fast lane, no Ray and no sockets")
    config.addinivalue_line("markers", "e2e: real Ray cluster, redis-server and sockets")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        lane = Path(str(item.fspath)).parent.name
        if lane in LANES:
            item.add_marker(getattr(pytest.mark, lane))
