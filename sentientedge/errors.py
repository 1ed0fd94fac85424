"""SentientEdge's exceptions.

The whole tree:

- SentientEdgeError
    - ConfigError               a setting has a bad value (names the variable)
    - ProtocolError             a client frame breaks PROTOCOL.md; carries the error code
        - BadFrame              not decodable, not a map, no op, a field of the wrong shape
        - UnknownOp
        - BadTopic
        - Forbidden
    - AuthError                 credentials missing, malformed, wrongly signed, expired, revoked
        - LoginRefused          an admin's password or one-time code was wrong (admins.py)
    - EnrolmentRefused          a bad admin name or password at enrolment (admins.py)
    - AdminRecordError          a stored admin record cannot be read back (admins.py)
    - SealingError              a stored or end-to-end sealed blob does not open (sealing.py)
    - StoreUnavailable          Redis cannot be reached or cannot take a write
    - ArchiveUnavailable        PostgreSQL cannot be reached or cannot take a write (database.py)
    - RouterUnavailable         a router actor cannot be reached
    - WireError                 a stream between router processes carried garbage (wire.py)
    - BadHistoryRequest         a ``GET /history`` query is malformed: answered 400 (archive.py)
    - MavlinkError              the MAVLink bridge's (mavlink.py, mavlink_bridge.py)
        - CommandError          a command that cannot become MAVLink: its result is "error"
            - UnknownCommand
            - BadParameter      a parameter missing or out of range
            - UnknownMode       a mode the vehicle's autopilot does not have
            - NotReady          what the command needs is not known yet (the vehicle)
        - BridgeFailed          the bridge cannot go on (never names a credential)
    - ClientError               raised by sentientedge.client
        - ConnectRejected       the handshake was answered with an HTTP error
        - ServerError           the server answered a frame with ``error``
        - ConnectionClosed      the connection is gone

Messages are short lowercase fragments.
"""

from __future__ import annotations

from typing import Any


class SentientEdgeError(Exception):
    """Base class of every SentientEdge exception."""


class ConfigError(SentientEdgeError):
    def __init__(self, variable: str, value: object, reason: str) -> None:
        super().__init__(f"{variable}={value!r}: {reason}")
        self.variable = variable
        self.value = value
        self.reason = reason


class ProtocolError(SentientEdgeError):
    """A frame from a client breaks the protocol; answered with ``error``, never a close."""

    code = "internal"

    def __init__(self, message: str, frame_id: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.frame_id = frame_id


class BadFrame(ProtocolError):
    code = "bad_frame"


class UnknownOp(ProtocolError):
    code = "unknown_op"


class BadTopic(ProtocolError):
    code = "bad_topic"


class Forbidden(ProtocolError):
    code = "forbidden"


class AuthError(SentientEdgeError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StoreUnavailable(SentientEdgeError):
    """Redis cannot be reached or cannot take a write right now."""


class ArchiveUnavailable(SentientEdgeError):
    """PostgreSQL (or PgBouncer before it) cannot be reached or cannot take a write now."""


class RouterUnavailable(SentientEdgeError):
    """A router actor cannot be reached."""


class BadHistoryRequest(SentientEdgeError):
    """A ``GET /history`` query is malformed; the message says what, for the 400 answer."""


class ClientError(SentientEdgeError):
    """Raised by :mod:`sentientedge.client`."""


class ConnectRejected(ClientError):
    def __init__(self, status: int, body: dict[str, Any] | None, headers: dict[str, str]) -> None:
        reason = (body or {}).get("reason") or (body or {}).get("error") or ""
        super().__init__(f"handshake rejected with HTTP {status}: {reason}".rstrip(": "))
        self.status = status
        self.body = body or {}
        self.headers = headers


class ServerError(ClientError):
    def __init__(self, code: str, message: str, frame_id: object = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.frame_id = frame_id


class ConnectionClosed(ClientError):
    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class MavlinkError(SentientEdgeError):
    """Base class of the MAVLink bridge's errors."""


class CommandError(MavlinkError):
    """A command that cannot be translated into MAVLink; answered with result "error"."""


class UnknownCommand(CommandError):
    pass


class BadParameter(CommandError):
    pass


class UnknownMode(CommandError):
    pass


class NotReady(CommandError):
    pass


class BridgeFailed(MavlinkError):
    """The bridge cannot go on; the message never holds a credential."""
