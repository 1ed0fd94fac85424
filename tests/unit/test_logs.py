"""JSON log lines (sentientedge/logs.py): every field there, nothing secret."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from sentientedge import auth
from sentientedge.logs import JsonFormatter, configure, redact

TOKEN = auth.mint_jwt("s" * 32, "alice", "operator", 60)
KEY = auth.issue_api_key("k" * 32, "drone-7").key


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """This process's logging set up as a router process's, then put back as pytest had it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure("debug", node="10.0.0.5", actor="ingress-3", stream=stream)
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def test_a_line_is_one_json_object_with_the_ids_that_matter(json_logs: io.StringIO):
    log = logging.getLogger("sentientedge.ingress.server")
    log.info("closing %s", "c-1", extra={"connection": "c-1", "session": "s-9", "drone": "7"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("frame failed")
    stream = json_logs
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "info" and first["event"] == "closing c-1"
    assert (first["node"], first["actor"], first["component"]) == (
        "10.0.0.5",
        "ingress-3",
        "sentientedge.ingress.server",
    )
    assert (first["connection"], first["session"], first["drone"]) == ("c-1", "s-9", "7")
    assert first["ts"].endswith("+00:00")
    assert second["level"] == "error" and "ValueError: boom" in second["exc"]


def test_credentials_never_reach_a_line():
    formatter = JsonFormatter("n", "a")
    texts = [
        f"handshake with token {TOKEN}",
        f"drone key {KEY} refused",
        "redis at redis://:hunter2-redis-password@10.0.0.1:6380/0",
        "JWT_SECRET=abcdefghijabcdefghijabcdefghij12 API_KEY_SECRET=zyxwvutsrqzyxwvutsrq98765",
        "Authorization: Bearer opaque-bearer-value",
        'login {"password": "correct horse"}',
    ]
    for text in texts:
        record = logging.LogRecord("x", logging.WARNING, __file__, 1, text, None, None)
        line = formatter.format(record)
        json.loads(line)
        for secret in (
            TOKEN,
            KEY,
            "hunter2",
            "abcdefghij",
            "zyxwvutsrq",
            "opaque-bearer-value",
            "correct horse",
        ):
            assert secret not in line, (text, line)
    assert redact("nothing to hide here") == "nothing to hide here"
