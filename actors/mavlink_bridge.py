"""The MAVLink bridge actor: one vehicle's bridge (sentientedge.mavlink_bridge) in a Ray actor,
so that it runs on the node the vehicle's link reaches (its serial port, its radio's UDP).

Thin: the work is :class:`sentientedge.mavlink_bridge.Bridge`. It starts bridging from its
constructor, so a process that Ray starts again (``max_restarts``) bridges again unasked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from actors import ray_api
from sentientedge import logs
from sentientedge.mavlink_bridge import Bridge, BridgeSettings

log = logging.getLogger(__name__)


class MavlinkBridge:
    def __init__(self, settings: BridgeSettings, log_level: str = "INFO") -> None:
        logs.configure(log_level, ray_api.node_ip(), f"mavlink-{settings.drone_id}")
        self.bridge = Bridge(settings)
        self._stop = asyncio.Event()
        # In Ray, an async actor's constructor runs on its event loop: bridge from here.
        self._running = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self.bridge.run(self._stop)
        except Exception:
            # A bridge that cannot go on (its key refused, its link not there) says so in the
            # actor's log and in ``wait``; restarting would only fail the same way.
            log.exception("mavlink bridge for drone %s stopped", self.bridge.settings.drone_id)
            raise

    async def wait(self) -> None:
        """Until the bridge stops; raises what stopped it."""
        await asyncio.shield(self._running)

    async def stats(self) -> dict[str, Any]:
        return {**self.bridge.stats(), "node": ray_api.node_of_current_actor()}

    async def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            await asyncio.shield(self._running)
