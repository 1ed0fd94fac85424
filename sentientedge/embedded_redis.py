"""The embedded default: a private ``redis-server`` for a router started without ``REDIS_URL``.

Durability settings (README, "Redis durability"): append-only file on, fsync every second.
Data lives in ``STATE_DIR/redis``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sentientedge.errors import StoreUnavailable

START_TIMEOUT_S = 20.0


class EmbeddedRedis:
    def __init__(self, state_dir: str | Path, port: int, appendfsync: str = "everysec") -> None:
        self.dir = Path(state_dir) / "redis"
        self.port = port
        self.appendfsync = appendfsync

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.dir / "redis.pid"

    def _write_conf(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.port}",
                    "protected-mode yes",
                    "daemonize yes",
                    f"pidfile {self.pidfile}",
                    f"dir {self.dir}",
                    f"logfile {self.dir / 'redis.log'}",
                    "appendonly yes",
                    f"appendfsync {self.appendfsync}",
                    'save ""',
                    "maxclients 10000",
                    "",
                ]
            )
        )
        return conf

    def running(self) -> bool:
        try:
            # One try: redis-py's default retries with backoff would take seconds to say no.
            client = redis.Redis(
                host="127.0.0.1",
                port=self.port,
                socket_connect_timeout=0.5,
                retry=Retry(NoBackoff(), 0),
            )
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.RedisError, OSError):
            return False

    def start(self) -> bool:
        """Start the server unless one already answers; True when this call started it."""
        if self.running():
            return False
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise StoreUnavailable(
                "redis-server is not installed: run scripts/setup, or set REDIS_URL"
            )
        subprocess.run([binary, str(self._write_conf())], check=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.running():
            if time.monotonic() > deadline:
                raise StoreUnavailable(
                    f"redis-server did not answer on port {self.port}; see {self.dir}"
                )
            time.sleep(0.1)
        return True

    def stop(self) -> None:
        if not self.pidfile.exists():
            return
        pid = int(self.pidfile.read_text().strip() or 0)
        if pid <= 0:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
