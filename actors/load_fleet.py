"""Load-generator workers as Ray actors, one per node in turn (``run(scenario, on_ray=True)``).

The backend of :class:`sentientedge.loadgen.LoadRun` that reaches Ray; the workers themselves
are :class:`actors.load_worker.LoadWorker`.
"""

from __future__ import annotations

from typing import Any

from actors import ray_api
from actors.load_worker import LoadWorker
from sentientedge.loadgen import LoadBackend, WorkerPlan, WorkerTally

LOADGEN_NAMESPACE = "sentientedge-loadgen"


class RayLoadBackend(LoadBackend):
    """One Ray actor per worker, spread over the cluster's nodes."""

    def __init__(self, plans: list[WorkerPlan], ray_address: str) -> None:
        ray_api.connect(ray_address, LOADGEN_NAMESPACE)
        self.workers = [ray_api.create_load_worker(LoadWorker, i) for i in range(len(plans))]
        self._runs = [ray_api.call(w, "run", p) for w, p in zip(self.workers, plans, strict=True)]

    def snapshots(self) -> list[dict[str, Any]]:
        return [ray_api.call_sync(w, "snapshot", timeout=5) for w in self.workers]

    def stop(self) -> None:
        for worker in self.workers:
            ray_api.call_sync(worker, "stop", timeout=5)

    def done(self) -> bool:
        return bool(ray_api.all_done(self._runs))

    def results(self) -> list[WorkerTally]:
        raws = ray_api.get(self._runs)
        self.nodes = [ray_api.call_sync(w, "node", timeout=10) for w in self.workers]
        for worker in self.workers:
            ray_api.kill(worker)
        return [WorkerTally.from_dict(raw) for raw in raws]
