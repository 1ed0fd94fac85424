"""One logging setup for every router process: JSON lines, for ELK (or anything that reads them).

Rules for this module:
- A line is one JSON object: ``ts`` (ISO 8601, UTC), ``level``, ``component`` (the logger),
  ``node``, ``actor``, ``event`` (the message), and the ids that matter when the call passes
  them (``extra={"connection": ..., "session": ..., "drone": ...}``); ``exc`` holds a traceback.
- Nothing secret reaches a line: tokens (JWTs), API keys, passwords in URLs and the values of
  ``*_SECRET=`` / ``password=`` / ``Authorization:`` are masked, whatever the caller logged.
- ``LOG_LEVEL`` (default INFO) sets the level; Ray keeps each actor's standard error in its log
  directory (``/tmp/ray/session_latest/logs/worker-*.err``), where a shipper picks them up
  (deploy/filebeat/filebeat.yml).
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
from typing import Any

IDS = ("connection", "session", "drone", "ingress", "shard", "principal")

_SECRETS = (
    # JWTs: three base64url parts, the first an encoded JSON header ("eyJ").
    (re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"), "<token>"),
    # The router's API keys.
    (re.compile(r"\bsek[12]\.[A-Za-z0-9_.-]+"), "<api key>"),
    # user:password@ in URLs (redis://:secret@host).
    (re.compile(r"(://[^:/@\s]*:)[^@\s]+@"), r"\1***@"),
    # NAME_SECRET=value, password=value, "password": "value", token=..., Authorization: ...
    (
        re.compile(
            r'(?i)\b([A-Z_]*SECRET|password|passwd|token|api_key|otp)("?\s*[=:]\s*)("[^"]*"|\S+)'
        ),
        r"\1\2***",
    ),
    (re.compile(r"(?i)(authorization:\s*\w+\s+)\S+"), r"\1***"),
)


def redact(text: str) -> str:
    """``text`` with anything that looks like a credential masked."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    def __init__(self, node: str = "", actor: str = "") -> None:
        super().__init__()
        self.node = node
        self.actor = actor

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "component": record.name,
            "node": self.node,
            "actor": self.actor,
            "event": redact(record.getMessage()),
        }
        for name in IDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = redact(str(value))
        audit = record.__dict__.get("audit")
        if isinstance(audit, dict):
            line["audit"] = audit
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, default=str, separators=(",", ":"))


def configure(level: str, node: str = "", actor: str = "", stream: Any = None) -> None:
    """Every log line of this process as JSON on standard error (once per process)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(node, actor))
    for existing in list(root.handlers):  # one format for every line this process writes
        root.removeHandler(existing)
    root.addHandler(handler)
    logging.captureWarnings(True)  # warnings too, as JSON lines
    root.setLevel(level.upper())
    # Ray's own loggers keep their handlers (its log files); ours go through the root.
    logging.getLogger("sentientedge").setLevel(level.upper())
    logging.getLogger("actors").setLevel(level.upper())
