"""The audit trail: one JSON line per security event.

Rules for this module:
- Events: ``handshake_refused``, ``admin_request``, ``login`` (success or failure),
  ``token_minted``, ``token_revoked``, ``key_issued``, ``key_revoked``, ``scale``, ``drain``,
  ``restart``. Each line has ``ts`` (ISO 8601, UTC), ``event``, ``component`` and the fields
  that matter (who, from where, what, the outcome).
- Never a secret: fields named like credentials are dropped before writing, whatever the caller
  passed; ids (a token's ``jti``, an API key's id) are what identify a credential here.
- Written to ``AUDIT_LOG`` (default ``STATE_DIR/audit.log``, mode 0600, appended by every
  router process of the node in whole lines) and to the ``sentientedge.audit`` logger, so it
  goes wherever the logs go. ``AUDIT_LOG=-`` writes to standard error only.
- Bounded: past ``max_per_s`` lines a second (a flood of refused handshakes) lines are counted,
  not written, and the count is written with the next line.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger("sentientedge.audit")

# Field names whose values are never written, whoever passes them.
SECRET_FIELDS = frozenset(
    {"token", "password", "otp", "secret", "api_key", "key", "authorization", "totp_secret"}
)


def audit_path(audit_log: str | None, state_dir: str) -> str:
    """Where the trail goes: ``AUDIT_LOG``, else ``STATE_DIR/audit.log``."""
    return audit_log or str(Path(state_dir) / "audit.log")


class AuditLog:
    def __init__(
        self,
        path: str,
        component: str,
        *,
        max_per_s: float = 100.0,
        clock: Callable[[], float] = time.monotonic,
        sink: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """``sink``: also hands each event's document to it (the archive's audit table)."""
        self.path = path
        self._sink = sink
        self.component = component
        self._max_per_s = max_per_s
        self._clock = clock
        self._window_start = clock()
        self._in_window = 0
        self.suppressed = 0
        self._file: TextIO | None = None

    def _open(self) -> TextIO:
        if self._file is None:
            if self.path == "-":
                self._file = sys.stderr
            else:
                path = Path(self.path)
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                os.fchmod(fd, 0o600)  # one made by an older version or another umask
                self._file = os.fdopen(fd, "a", buffering=1)
        return self._file

    def record(self, event: str, **fields: Any) -> None:
        """Write one event; never raises (an audit failure is logged, the request goes on)."""
        now = self._clock()
        if now - self._window_start >= 1.0:
            self._window_start, self._in_window = now, 0
        self._in_window += 1
        if self._in_window > self._max_per_s:
            self.suppressed += 1
            return
        document = self.document(event, fields)
        try:
            handle = self._open()
            handle.write(json.dumps(document, default=str, separators=(",", ":")) + "\n")
            handle.flush()
        except OSError as exc:
            log.warning("audit log %s not writable: %s", self.path, exc)
        if self._sink is not None:
            self._sink(document)
        log.info(event, extra={"audit": document})

    def document(self, event: str, fields: dict[str, Any]) -> dict[str, Any]:
        document: dict[str, Any] = {
            "ts": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "event": event,
            "component": self.component,
        }
        for name, value in fields.items():
            if name.lower() not in SECRET_FIELDS and value is not None:
                document[name] = value
        if self.suppressed:
            document["suppressed_before"] = self.suppressed
            self.suppressed = 0
        return document

    def close(self) -> None:
        if self._file is not None and self._file is not sys.stderr:
            self._file.close()
        self._file = None
