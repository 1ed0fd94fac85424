"""The load worker actor: one process driving a share of a simulated fleet (sentientedge.loadgen).

Thin: the work is :class:`sentientedge.loadgen.Worker`; spread over the nodes of the cluster,
more workers give more load.
"""

from __future__ import annotations

from typing import Any

from sentientedge.loadgen import Worker, WorkerPlan


class LoadWorker:
    def __init__(self) -> None:
        self.worker: Worker | None = None

    async def run(self, plan: WorkerPlan) -> dict[str, Any]:
        self.worker = Worker(plan)
        tally = await self.worker.run()
        return tally.to_dict()

    async def snapshot(self) -> dict[str, Any]:
        if self.worker is None:
            return {
                "sent": 0,
                "delivered": 0,
                "recent_latency": {"counts": {}, "total": 0, "max_s": 0.0},
            }
        return self.worker.snapshot()

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop_event.set()

    async def node(self) -> str:
        from actors import ray_api

        return ray_api.node_of_current_actor()
