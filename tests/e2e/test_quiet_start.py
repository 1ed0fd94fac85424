"""`scripts/start` and `sentientedge down` as a person runs them: only the router's own lines.

They run word for word (setup, `up` starting a local Ray head and an embedded Redis, the demo,
then `down` with its `ray stop`) in PID, mount and network namespaces of their own, as
test_ray_up_fake.py runs cluster.yaml: `ray stop` ends every Ray process it can see, and here it
sees only its own; the default ports (4000, 6379, 8265) are free on a loopback of its own; Ray's
/tmp/ray is a private tmpfs. The session's Ray cluster, which the other tests share, is not
touched, and whatever the run started dies with it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from actors import ray_api
from sentientedge import auth, state
from sentientedge.config import Config
from tests.helpers import REPO

RUN = """
set -u
ip link set lo up
mkdir -p /tmp/ray && mount -t tmpfs -o size=2g tmpfs /tmp/ray
cd "$0"
scripts/start 2>&1; echo "@@ start exited $?"
.venv/bin/sentientedge down 2>&1; echo "@@ down exited $?"
"""

ISOLATED = [
    "unshare",
    "--pid",
    "--fork",
    "--kill-child",  # a timed-out run takes everything it started with it
    "--mount-proc",
    "--mount",
    "--net",
    "--propagation",
    "private",
    "bash",
    "-c",
    RUN,
    str(REPO),
]

# Only what a shell on a fresh machine has: nothing of the session's router, Ray or Redis.
KEPT = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TERM", "PYTHONPATH")

NOISE = re.compile(r"warn|deprecat|traceback|\(raylet\)|\(pid=", re.IGNORECASE)
# Ray's log lines: its Python loggers' and its core's ("[2026-01-01 00:00:00,000 W 14 14] ...").
RAY_LOG_LINE = re.compile(r"^\[?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+[DIWEF]")
CONSOLE = re.compile(r"^console:\s+(http://127\.0\.0\.1:4000/console)#token=([\w.-]+)\s")
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def test_scripts_start_and_down_print_only_the_routers_lines(ray_cluster: str, tmp_path: Path):
    session_nodes = ray_api.alive_node_ids()
    state_dir = tmp_path / "state"
    env = {name: os.environ[name] for name in KEPT if name in os.environ}
    env.update(STATE_DIR=str(state_dir), DEMO_SECONDS="3", DEMO_DRONES="3")
    argv = ISOLATED if os.geteuid() == 0 else ["sudo", "-n", "--preserve-env", *ISOLATED]
    result = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=280, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    start, _, rest = output.partition("@@ start exited ")
    start_status, _, down = rest.partition("\n")
    down, _, down_status = down.partition("@@ down exited ")
    assert start_status == "0", output[-3000:]
    assert down_status.strip() == "0", output[-3000:]

    # The console's link, signed in as an observer (the one line that may carry a token).
    [link] = [m for m in map(CONSOLE.match, start.splitlines()) if m]
    url, token = link.groups()
    assert url == "http://127.0.0.1:4000/console"
    config = state.ensure_secrets(Config.from_env({"STATE_DIR": str(state_dir)}))
    identity = auth.verify_jwt(token, config.verifier)
    assert identity.role is auth.Role.OBSERVER
    assert identity.expires_at is not None
    assert 11.9 * 3600 < identity.expires_at - time.time() <= 12 * 3600

    # Nothing but the router's own lines: no warning, no deprecation, no traceback, no Ray log.
    for line in (start + down).splitlines():
        line = JWT.sub("<token>", line)
        assert not NOISE.search(line), f"noise: {line!r}\n\n{output}"
        assert not RAY_LOG_LINE.match(line), f"a Ray log line: {line!r}\n\n{output}"
    assert "connect:   ws://127.0.0.1:4000/ws" in start
    assert re.search(r"^demo done: [1-9]\d* messages received$", start, re.MULTILINE), start
    assert "embedded redis stopped" in down and "local ray stopped" in down, down

    # No token in any log line: the audit trail names the console's token by its jti alone.
    audit = (state_dir / "audit.log").read_text()
    assert "token_minted" in audit and not JWT.search(audit)
    assert token not in output.replace(link.group(0), "")

    # The session's cluster, shared by the other tests, is as it was.
    assert ray_api.alive_node_ids() == session_nodes
