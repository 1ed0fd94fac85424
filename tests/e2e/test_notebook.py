"""The example notebook runs to the end against the router, headless, and draws its plot."""

from __future__ import annotations

import ast
import asyncio

import nbformat
from nbclient import NotebookClient

from tests.e2e.support import Router
from tests.helpers import REPO


def _execute(router: Router, tmp_dir: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(REPO / "examples" / "fleet_load.ipynb", as_version=4)
    client = NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": tmp_dir}}
    )
    client.execute(env={**router.env, "SENTIENTEDGE_URL": router.url})
    return notebook


async def test_example_notebook_runs_and_plots(router: Router, tmp_path):
    notebook = await asyncio.to_thread(_execute, router, str(tmp_path))
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    summary = ast.literal_eval(
        next(
            o["data"]["text/plain"]
            for cell in notebook.cells
            if "summary = results.summary()" in cell.source
            for o in cell.outputs
            if o.output_type == "execute_result"
        )
    )
    assert 480 <= summary["offered"] <= 510  # 10 drones x 10 Hz x 5 s
    assert summary["delivered"] + summary["lost"] == summary["expected"]
    assert summary["commands"]["received_by_drones"] == summary["commands"]["acked"] > 0
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plot was drawn"
