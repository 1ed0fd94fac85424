"""The Grafana dashboards under deploy/grafana are what scripts/dashboards.py writes."""

from __future__ import annotations

import importlib.util
import json

from tests.helpers import REPO


def test_dashboards_are_generated_from_their_panel_lists():
    spec = importlib.util.spec_from_file_location("dashboards", REPO / "scripts" / "dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert len(module.DASHBOARDS) == 6
    for title, (uid, panels) in module.DASHBOARDS.items():
        path = REPO / "deploy" / "grafana" / f"{uid.removeprefix('se-')}.json"
        assert json.loads(path.read_text()) == module.dashboard(title, uid, panels), path.name
