"""PostgreSQL 15 and PgBouncer (Debian's) on 127.0.0.1 for the archive's tests.

Both refuse to run as root, so they run as Debian's ``postgres`` user, in a directory of
their own. PgBouncer runs on the configuration the project ships (``deploy/pgbouncer``), with
this run's ports and paths.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg

from tests.helpers import REPO, free_port, wait_until

# Debian's server binaries, newest version installed (15 on bookworm).
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), default=Path("/usr/lib/postgresql/15/bin"))
PASSWORD = "router-test-password"


def _as_postgres(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *command],
        capture_output=True,
        text=True,
        check=False,
        **kwargs,
    )


def _spawn_as_postgres(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["runuser", "-u", "postgres", "--", *command],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),
        start_new_session=True,
    )


def ini_with(text: str, **settings: str) -> str:
    """``text`` (an ini file) with each ``key = value`` line of these keys replaced."""
    for key, value in settings.items():
        text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert count == 1, f"{key} not in the shipped pgbouncer.ini"
    return text


class Postgres:
    def __init__(self) -> None:
        if shutil.which("pgbouncer") is None or not (PG_BIN / "postgres").exists():
            raise RuntimeError("postgresql and pgbouncer are not installed; scripts/setup does")
        self.directory = Path(tempfile.mkdtemp(prefix="se-pg-"))
        shutil.chown(self.directory, "postgres", "postgres")
        self.data = self.directory / "data"
        self.port = free_port()
        self.bouncer_port = free_port()
        self.server: subprocess.Popen[bytes] | None = None
        self.bouncer: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Through PgBouncer, as the router uses it."""
        return f"postgresql://router:{PASSWORD}@127.0.0.1:{self.bouncer_port}/sentientedge"

    @property
    def direct_url(self) -> str:
        """PostgreSQL itself, as its owner: for the tests' own checks."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/sentientedge"

    def start(self) -> Postgres:
        try:
            return self._start()
        except BaseException:
            self.stop()  # nothing outlives a start that failed
            raise

    def _start(self) -> Postgres:
        result = _as_postgres(
            [str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
             "--no-locale", "-E", "UTF8"]
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        self.start_server()
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as db:
            db.execute(f"CREATE ROLE router LOGIN PASSWORD '{PASSWORD}'")
            db.execute("CREATE DATABASE sentientedge OWNER router")
        self._start_bouncer()
        return self

    def start_server(self) -> None:
        self.server = _spawn_as_postgres(
            [str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.directory), "-c", "listen_addresses=127.0.0.1"],
            self.directory / "postgres.log",
        )  # fmt: skip
        wait_until(self.ready, 30, "PostgreSQL")

    def stop_server(self) -> None:
        """A fast shutdown, as an operator's restart does: sessions are ended, data kept."""
        if self.server is not None:
            os.killpg(self.server.pid, signal.SIGINT)
            self.server.wait(30)
            self.server = None

    def ready(self) -> bool:
        try:
            with psycopg.connect(
                f"postgresql://postgres@127.0.0.1:{self.port}/postgres", connect_timeout=2
            ):
                return True
        except psycopg.Error:
            return False

    def _start_bouncer(self) -> None:
        shipped = (REPO / "deploy" / "pgbouncer" / "pgbouncer.ini").read_text()
        config = ini_with(
            shipped,
            listen_port=str(self.bouncer_port),
            unix_socket_dir=str(self.directory),
            auth_file=str(self.directory / "userlist.txt"),
            logfile=str(self.directory / "pgbouncer.log"),
            pidfile=str(self.directory / "pgbouncer.pid"),
        ).replace("port=5432", f"port={self.port}")
        for name, text in (("pgbouncer.ini", config), ("userlist.txt", f'"router" "{PASSWORD}"\n')):
            path = self.directory / name
            path.write_text(text)
            shutil.chown(path, "postgres", "postgres")
        self.bouncer = _spawn_as_postgres(
            ["pgbouncer", str(self.directory / "pgbouncer.ini")], self.directory / "bouncer.out"
        )

        def answers() -> bool:
            try:
                with psycopg.connect(self.url, connect_timeout=2, prepare_threshold=None):
                    return True
            except psycopg.Error:
                return False

        wait_until(answers, 30, "PgBouncer")

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.direct_url, autocommit=True) as db:
            cursor = db.execute(sql, params or None)
            return cursor.fetchall() if cursor.description else []

    def stop(self) -> None:
        for process in (self.bouncer, self.server):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
                process.wait(30)
        shutil.rmtree(self.directory, ignore_errors=True)
