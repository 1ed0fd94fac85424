"""The embedded default: a private ``redis-server`` for a router started without ``REDIS_URL``.

Durability settings (README, "Redis durability"): append-only file on, fsync every second.
Data lives in ``STATE_DIR/redis``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sentientedge import state
from sentientedge.config import Config, redact_url
from sentientedge.errors import StoreUnavailable

START_TIMEOUT_S = 20.0


def primary_address() -> str:
    """This machine's address on its default route (no packet is sent): where other nodes
    reach a server bound to 0.0.0.0."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.254.254.254", 1))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


class EmbeddedRedis:
    """A ``redis-server`` in ``STATE_DIR/redis``, with a password; on 127.0.0.1 unless
    ``bind`` says otherwise (a cluster whose nodes all reach it: ``EMBEDDED_REDIS_HOST``)."""

    def __init__(
        self,
        state_dir: str | Path,
        port: int,
        appendfsync: str = "everysec",
        password: str | None = None,
        bind: str = "127.0.0.1",
        maxmemory: str = "2gb",
    ) -> None:
        self.dir = Path(state_dir) / "redis"
        self.port = port
        self.appendfsync = appendfsync
        self.password = password
        self.bind = bind
        self.maxmemory = maxmemory

    @classmethod
    def for_config(cls, config: Config) -> EmbeddedRedis:
        return cls(
            config.state_dir,
            config.embedded_redis_port,
            config.redis_appendfsync,
            password=state.embedded_redis_password(config),
            bind=config.embedded_redis_host,
            maxmemory=config.embedded_redis_maxmemory,
        )

    @property
    def host(self) -> str:
        """Where clients reach it."""
        if self.bind in ("127.0.0.1", "localhost"):
            return "127.0.0.1"
        return primary_address() if self.bind == "0.0.0.0" else self.bind

    @property
    def url(self) -> str:
        """The URL the router uses (with the password: never print it; see ``shown_url``)."""
        credentials = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{credentials}{self.host}:{self.port}/0"

    @property
    def shown_url(self) -> str:
        return redact_url(self.url)

    @property
    def pidfile(self) -> Path:
        return self.dir / "redis.pid"

    def _write_conf(self) -> Path:
        # Its data is every stored message: readable by this user only.
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        conf = self.dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(
                "\n".join(
                    [
                        f"bind {self.bind}",
                        *([f"requirepass {self.password}"] if self.password else []),
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
                        # Full is an error (QoS 1 publishers hear "unavailable"), never an
                        # eviction: evicting would drop acknowledged messages silently.
                        f"maxmemory {self.maxmemory}",
                        "maxmemory-policy noeviction",
                        "",
                    ]
                )
            )
        return conf

    def running(self) -> bool:
        try:
            # One try: redis-py's default retries with backoff would take seconds to say no.
            client = redis.Redis(
                # Bound to every interface or loopback: ask on loopback; else where it is.
                host="127.0.0.1" if self.bind in ("0.0.0.0", "localhost") else self.bind,
                port=self.port,
                password=self.password,
                socket_connect_timeout=0.5,
                retry=Retry(NoBackoff(), 0),
            )
            try:
                return bool(client.ping())
            finally:
                client.close()
        except redis.AuthenticationError:
            return True  # a server answers there (one with another password)
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
