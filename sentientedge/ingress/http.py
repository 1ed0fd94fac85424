"""HTTP on the WebSocket port: request heads parsed here, and the plain HTTP endpoints.

Rules for this module:
- :func:`parse_request` is pure: bytes in, a whole request (head and body) out, or ``None``
  until it is complete, or :class:`HttpError` with the status to answer. Every request gets an
  HTTP answer, with or without a body; then the connection closes (``Connection: close``).
- Bodies need ``Content-Length`` (chunked ones are answered 411) and are bounded.
- The endpoints (health, metrics, admin) read the server; they never raise: a failure is a
  status code.
- The console (``/console``) is a fixed set of package files, looked up by exact path (nothing
  from the request reaches the file system), served to anyone with a strict
  Content-Security-Policy; its data needs a token, over the WebSocket like any client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import importlib.resources
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from websockets.datastructures import Headers, MultipleValuesError

from sentientedge import codec
from sentientedge.admins import (
    ADMIN_AMR,
    AdminRecord,
    AdminRecordError,
    LoginRefused,
    LoginThrottle,
    check_login,
)
from sentientedge.archive import parse_history_request
from sentientedge.auth import (
    Credentials,
    Identity,
    Role,
    authenticate,
    mint_jwt,
    token_claims_unverified,
    verify_jwt,
)
from sentientedge.errors import ArchiveUnavailable, AuthError, BadHistoryRequest, StoreUnavailable
from sentientedge.metrics import render

if TYPE_CHECKING:
    from sentientedge.ingress.server import IngressServer

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
STATUS_TIMEOUT_S = 10.0


_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

SCALE_PATHS = {"/admin/scale-up": 1, "/admin/scale-down": -1}
MAX_SCALE_STEP = 1000


# The browser console: path -> (file in sentientedge/console, Content-Type).
CONSOLE_FILES = {
    "/console": ("index.html", "text/html; charset=utf-8"),
    "/console/": ("index.html", "text/html; charset=utf-8"),
    "/console/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console/console.css": ("console.css", "text/css; charset=utf-8"),
}
CONSOLE_WHOAMI = "/console/whoami"
# A Host header fit to name the page's own origin in its policy: a name or an IP literal, and a
# port. Anything else (a space, a ';') would change the policy, so it is left out.
_HOST = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


@functools.cache
def console_file(name: str) -> bytes:
    """One of the console's files, read once from the package (OSError when not installed)."""
    return importlib.resources.files("sentientedge").joinpath("console", name).read_bytes()


def console_policy(host: str | None) -> str:
    """The console's Content-Security-Policy: its own scripts and styles only, no inline code,
    no frames around it (its command buttons must not be clickjacked), forms posting nowhere,
    and connections only back to its own origin. ``'self'`` covers ``ws:``/``wss:`` to the same
    host in CSP 3 browsers; the explicit ``ws://HOST wss://HOST`` covers older ones and a TLS
    terminator in front (the page on https, the router on plain ws behind it)."""
    connect = "'self'"
    if host and _HOST.fullmatch(host):
        connect += f" ws://{host} wss://{host}"
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src {connect}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def console_headers(host: str | None, page: bool) -> dict[str, str]:
    """Headers of every console answer. The page itself may have been asked for with
    ``?token=``: it is never stored, and no request it makes names it in a Referer."""
    return {
        "Content-Security-Policy": console_policy(host),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Resource-Policy": "same-origin",
        "Cache-Control": "no-store" if page else "no-cache",
    }


def scale_request_instances(body: bytes) -> int:
    """How many instances a scale request asks for: ``{"instances": N}``, N >= 1, or 1 for
    an empty body. ValueError says what is wrong."""
    if not body.strip():
        return 1
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError('the body must be JSON: {"instances": N}') from None
    if not isinstance(document, dict) or set(document) - {"instances"}:
        raise ValueError('the body must be {"instances": N}')
    instances = document.get("instances", 1)
    if isinstance(instances, bool) or not isinstance(instances, int):
        raise ValueError("instances must be an integer")
    if not 1 <= instances <= MAX_SCALE_STEP:
        raise ValueError(f"instances must be between 1 and {MAX_SCALE_STEP}")
    return instances


def login_request(body: bytes) -> tuple[str, str, str]:
    """``{"user", "password", "otp"}``, each a string; ValueError says what is wrong (never
    with the values sent)."""
    try:
        document = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError('the body must be JSON: {"user", "password", "otp"}') from None
    if not isinstance(document, dict):
        raise ValueError('the body must be {"user", "password", "otp"}')
    fields = []
    for name in ("user", "password", "otp"):
        value = document.get(name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
        fields.append(value)
    return fields[0], fields[1], fields[2]


class HttpError(Exception):
    def __init__(self, status: http.HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: Headers
    body: bytes
    head_size: int  # bytes of the request line and headers, blank line included

    @property
    def wants_websocket(self) -> bool:
        return self.path == "/ws"


def parse_request(buffer: bytes | bytearray) -> tuple[HttpRequest, int] | None:
    """The request at the start of ``buffer`` and how many bytes it took, or None for now."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise HttpError(
                http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large"
            )
        return None
    if end > MAX_HEAD_BYTES:
        raise HttpError(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise HttpError(http.HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, _ = parts
    headers = Headers()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise HttpError(http.HTTPStatus.BAD_REQUEST, "malformed header line")
        value = value.strip()
        if _CONTROL_CHARS.search(value):  # RFC 9110 5.5: no control characters but tab
            raise HttpError(http.HTTPStatus.BAD_REQUEST, "control character in a header value")
        headers[name] = value
    try:
        if "Transfer-Encoding" in headers:
            raise HttpError(http.HTTPStatus.LENGTH_REQUIRED, "send the body with Content-Length")
        length_header = headers.get("Content-Length")
    except MultipleValuesError:
        raise HttpError(http.HTTPStatus.BAD_REQUEST, "Content-Length sent twice") from None
    length = 0
    if length_header is not None:
        # ASCII digits only ("²".isdigit() is true), and few enough for int() to take.
        if not (length_header.isascii() and length_header.isdigit()) or len(length_header) > 18:
            raise HttpError(http.HTTPStatus.BAD_REQUEST, "malformed Content-Length")
        length = int(length_header)
    if length > MAX_BODY_BYTES:
        raise HttpError(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body too large")
    total = end + 4 + length
    if len(buffer) < total:
        return None
    try:
        url = urlsplit(target)
    except ValueError:  # e.g. "//[": an authority that is not a valid IPv6 literal
        raise HttpError(http.HTTPStatus.BAD_REQUEST, "malformed request target") from None
    request = HttpRequest(
        method=method,
        path=url.path,
        query=dict(parse_qsl(url.query)),
        headers=headers,
        body=bytes(buffer[end + 4 : total]),
        head_size=end + 4,
    )
    return request, total


def response(
    status: http.HTTPStatus,
    body: bytes,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def error_response(
    status: http.HTTPStatus, error: str, reason: str, headers: dict[str, str] | None = None
) -> bytes:
    return response(
        status, json.dumps({"error": error, "reason": reason}).encode(), headers=headers
    )


def json_response(status: http.HTTPStatus, document: Any) -> bytes:
    return response(status, json.dumps(document).encode())


class HttpEndpoints:
    """``/health``, ``/metrics``, ``/admin/cluster-status``, ``/admin/scale-up|down``,
    ``/history`` and ``/console`` of one ingress."""

    def __init__(self, server: IngressServer) -> None:
        self.server = server
        self.login_throttle = LoginThrottle()
        # Argon2 takes a core and 64 MiB for 60 ms: two at a time, the loop stays free.
        self._login_slots = asyncio.Semaphore(2)

    async def answer(self, request: HttpRequest, peer: str = "") -> bytes:
        server = self.server
        path = request.path
        if path == "/auth/token":
            return await self._auth_token(request, peer)
        if path == "/health":
            report = server.health()
            serving = report["status"] != "unavailable"  # "degraded" still routes
            status = http.HTTPStatus.OK if serving else http.HTTPStatus.SERVICE_UNAVAILABLE
            return json_response(status, report)
        if path == "/metrics":
            return response(
                http.HTTPStatus.OK,
                await self._metrics(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        if path == "/metrics/targets":
            return await self._metrics_targets()
        if path == "/admin/cluster-status":
            return await self._cluster_status(request, peer)
        if path in SCALE_PATHS:
            return await self._scale(request, peer, SCALE_PATHS[path])
        if path == "/history":
            return await self._history(request)
        if path == "/console" or path.startswith("/console/"):
            return await self._console(request)
        return self.reject(http.HTTPStatus.NOT_FOUND, "not_found", f"no such path: {path[:100]}")

    async def _metrics(self) -> bytes:
        """Every router process's metrics (series told apart by ``node`` and ``actor``), so one
        scrape of the port shows the whole router; this process's alone if the others cannot
        be reached. Prometheus on a cluster scrapes each process (``/metrics/targets``)."""
        server = self.server
        if server.all_metrics is not None:
            try:
                return await asyncio.wait_for(server.all_metrics(), STATUS_TIMEOUT_S)
            except Exception as exc:  # the controller restarting, say
                log.warning("metrics of the other processes unavailable: %s", exc)
        return render(server.registry)

    async def _metrics_targets(self) -> bytes:
        """Prometheus HTTP service discovery: every router process's metrics endpoint."""
        if self.server.metrics_targets is None:
            return json_response(http.HTTPStatus.OK, [])
        try:
            targets = await asyncio.wait_for(self.server.metrics_targets(), STATUS_TIMEOUT_S)
        except Exception as exc:
            log.warning("metrics targets unavailable: %s", exc)
            return self.reject(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "unavailable", "controller unavailable"
            )
        return json_response(http.HTTPStatus.OK, targets)

    def reject(
        self,
        status: http.HTTPStatus,
        error: str,
        reason: str,
        headers: dict[str, str] | None = None,
    ) -> bytes:
        self.server.counters.handshakes[status.value] += 1
        return error_response(status, error, reason, headers)

    def _post_only(self) -> bytes:
        return self.reject(
            http.HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", "use POST", {"Allow": "POST"}
        )

    async def _auth_token(self, request: HttpRequest, peer: str) -> bytes:
        """``POST /auth/token``: an admin's name, password and current TOTP code for a short
        admin token with ``amr: ["pwd", "otp"]``. Failures are throttled per name and address."""
        if request.method != "POST":
            return self._post_only()
        try:
            name, password, otp = login_request(request.body)
        except ValueError as exc:
            return self.reject(http.HTTPStatus.BAD_REQUEST, "bad_request", str(exc))
        server, audit, throttle = self.server, self.server.audit, self.login_throttle
        # Counted here and across the router (Redis): every ingress sees every failure. Without
        # Redis this process's own count still holds.
        shared = throttle.shared_subjects(name, peer)
        wait = throttle.check(name, peer, time.monotonic())
        if wait is None:
            with contextlib.suppress(StoreUnavailable):
                wait = await server.store.login_wait(shared, throttle.window_s, time.time())
        if wait is not None:
            audit.record("login", admin=name, address=peer, outcome="throttled")
            return self.reject(
                http.HTTPStatus.TOO_MANY_REQUESTS,
                "too_many_attempts",
                "too many failed logins, wait",
                {"Retry-After": str(math.ceil(wait))},
            )
        try:
            stored = await server.store.admin(name)
            record = AdminRecord.from_mapping(stored) if stored else None
            async with self._login_slots:
                updated = await asyncio.to_thread(
                    check_login, record, password, otp, now=time.time()
                )
            if not await server.store.save_admin_login(
                name, updated.to_mapping(), updated.last_otp_step
            ):
                raise LoginRefused("otp_replayed")  # another login took this code first
        except (LoginRefused, AdminRecordError) as exc:
            detail = exc.detail if isinstance(exc, LoginRefused) else "bad_record"
            throttle.failed(name, peer, time.monotonic())
            with contextlib.suppress(StoreUnavailable):
                await server.store.login_failed(shared, throttle.window_s, time.time())
            audit.record("login", admin=name, address=peer, outcome="refused", detail=detail)
            return self.reject(http.HTTPStatus.UNAUTHORIZED, "unauthorized", "bad credentials")
        except StoreUnavailable:
            return self.reject(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "unavailable",
                "credential store unavailable, retry",
                {"Retry-After": "5"},
            )
        throttle.succeeded(name, peer)
        with contextlib.suppress(StoreUnavailable):
            await server.store.login_succeeded(shared[0][0])  # the name's count only
        config = server.config
        assert config.jwt_secret is not None
        ttl = min(config.admin_token_ttl, config.jwt_max_ttl)
        token = mint_jwt(
            config.jwt_secret,
            name,
            Role.ADMIN,
            ttl,
            amr=list(ADMIN_AMR),
            issuer=config.jwt_issuer,
            audience=config.jwt_audience,
        )
        jti = token_claims_unverified(token)["jti"]
        audit.record("login", admin=name, address=peer, outcome="ok")
        audit.record("token_minted", sub=name, role="admin", jti=jti, ttl_s=ttl, by="/auth/token")
        return json_response(http.HTTPStatus.OK, {"token": token, "expires_in": ttl})

    async def _refuse_unless_admin(self, request: HttpRequest, peer: str) -> bytes | None:
        """The answer to a request without an admin's token (401; 403 for another role, or
        without a second factor while ``ADMIN_MFA=required``), else None. Audited either way."""
        subject = None
        refusal: tuple[http.HTTPStatus, str, str] | None
        try:
            credentials = Credentials.from_request(request.headers, request.query)
            if not credentials.token:
                raise AuthError("admin endpoints need Authorization: Bearer <admin token>")
            identity = verify_jwt(credentials.token, self.server.verifier)
            subject = identity.subject
            if await self.server.store.is_revoked(identity):
                raise AuthError("token revoked")
        except AuthError as exc:
            refusal = (http.HTTPStatus.UNAUTHORIZED, "unauthorized", exc.reason)
        else:
            if identity.role is not Role.ADMIN:
                refusal = (http.HTTPStatus.FORBIDDEN, "forbidden", "admin role required")
            elif self.server.config.admin_mfa == "required" and not identity.has_second_factor:
                refusal = (
                    http.HTTPStatus.FORBIDDEN,
                    "mfa_required",
                    "admin endpoints need a token from POST /auth/token "
                    "(password and one-time code)",
                )
            else:
                refusal = None
        self.server.audit.record(
            "admin_request",
            method=request.method,
            path=request.path,
            sub=subject,
            address=peer,
            outcome="allowed" if refusal is None else refusal[1],
            reason=None if refusal is None else refusal[2],
        )
        if refusal is None:
            return None
        status, error, reason = refusal
        return self.reject(status, error, reason)

    async def _scale(self, request: HttpRequest, peer: str, direction: int) -> bytes:
        """``POST /admin/scale-up`` and ``/admin/scale-down``: 202 once the controller has
        accepted the step (it is carried out in the background), 409 outside the bounds."""
        if request.method != "POST":
            return self._post_only()
        refused = await self._refuse_unless_admin(request, peer)
        if refused is not None:
            return refused
        try:
            instances = scale_request_instances(request.body)
        except ValueError as exc:
            return self.reject(http.HTTPStatus.BAD_REQUEST, "bad_request", str(exc))
        try:
            answer = await asyncio.wait_for(
                self.server.request_scaling(direction * instances), STATUS_TIMEOUT_S
            )
        except Exception as exc:  # the controller may be restarting; say so
            log.warning("scaling request failed: %s", exc)
            return self.reject(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "unavailable", "controller unavailable"
            )
        self.server.audit.record(
            "scale",
            change=direction * instances,
            address=peer,
            outcome="refused" if "refused" in answer else "accepted",
            reason=answer.get("refused"),
            target=answer.get("target"),
        )
        if "refused" in answer:
            return self.reject(http.HTTPStatus.CONFLICT, "conflict", answer["refused"])
        return json_response(http.HTTPStatus.ACCEPTED, answer)

    async def _caller(self, request: HttpRequest, tokens_only: bool = False) -> Identity | bytes:
        """Who sent ``request``, checked as the WebSocket handshake checks it (revocation
        included); or the 401/503 answer. ``tokens_only``: a JWT in the Authorization header,
        not an API key nor anything in the query string (which proxies log)."""
        server = self.server
        try:
            credentials = Credentials.from_request(
                request.headers, {} if tokens_only else request.query
            )
            if tokens_only:
                if not credentials.token:
                    raise AuthError("no token: send Authorization: Bearer <token>")
                identity = verify_jwt(credentials.token, server.verifier)
            else:
                identity = authenticate(credentials, server.verifier)
            if await server.store.is_revoked(identity):
                raise AuthError("token revoked" if tokens_only else "credentials revoked")
        except AuthError as exc:
            return self.reject(http.HTTPStatus.UNAUTHORIZED, "unauthorized", exc.reason)
        except StoreUnavailable:
            return self.reject(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "unavailable", "cannot check revocation now"
            )
        return identity

    async def _history(self, request: HttpRequest) -> bytes:
        """``GET /history``: archived messages of a topic or filter the caller may subscribe
        to, oldest first, as ``{"messages": [msg frame, ...]}``; 404 without an archive."""
        server = self.server
        if request.method != "GET":
            return self.reject(
                http.HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", "use GET",
                {"Allow": "GET"},
            )  # fmt: skip
        if server.database is None:
            return self.reject(
                http.HTTPStatus.NOT_FOUND, "not_found", "no archive configured (DATABASE_URL)"
            )
        identity = await self._caller(request)
        if isinstance(identity, bytes):
            return identity
        try:
            query = parse_history_request(request.query, int(time.time() * 1000))
        except BadHistoryRequest as exc:
            return self.reject(http.HTTPStatus.BAD_REQUEST, "bad_request", str(exc))
        permissions = identity.permissions
        if not permissions.can_subscribe(query.topic_filter):
            return self.reject(
                http.HTTPStatus.FORBIDDEN, "forbidden", f"may not subscribe to {query.topic_filter}"
            )
        try:
            frames = await server.database.history(query)
        except ArchiveUnavailable as exc:
            log.warning("history read failed: %s", exc)
            return self.reject(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "unavailable", "archive unavailable, retry"
            )
        # An ACL narrower than the filter (a JWT's acl claim) still hides what it does not allow.
        readable = (f for f in frames if permissions.can_subscribe(str(f.get("topic", ""))))
        body = '{"messages":[' + ",".join(map(codec.encode_json, readable)) + "]}"
        return response(http.HTTPStatus.OK, body.encode())

    async def _console(self, request: HttpRequest) -> bytes:
        """``GET /console`` and its files: no credentials needed to load the page."""
        if request.path == CONSOLE_WHOAMI:
            return await self._whoami(request)
        wanted = CONSOLE_FILES.get(request.path)
        if wanted is None:
            return self.reject(
                http.HTTPStatus.NOT_FOUND, "not_found", f"no such path: {request.path[:100]}"
            )
        if request.method != "GET":
            return self.reject(
                http.HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", "use GET",
                {"Allow": "GET"},
            )  # fmt: skip
        name, content_type = wanted
        try:
            body = console_file(name)
        except OSError as exc:
            log.warning("console file %s unavailable: %s", name, exc)
            return self.reject(
                http.HTTPStatus.NOT_FOUND, "not_found", "console files not installed"
            )
        try:
            host = request.headers.get("Host")
        except MultipleValuesError:  # two Host headers: name no origin beyond 'self'
            host = None
        headers = console_headers(host, page=name == "index.html")
        return response(http.HTTPStatus.OK, body, content_type, headers)

    async def _whoami(self, request: HttpRequest) -> bytes:
        """``GET /console/whoami`` with ``Authorization: Bearer JWT``: whether the router takes
        the token, as the WebSocket handshake would, and whose it is (``sub``, ``role``,
        ``exp``); 401 with the reason otherwise. A browser cannot read why a handshake was
        refused, so the console asks here. The token is read from the header only, never the
        query string (which proxies log)."""
        if request.method != "GET":
            return self.reject(
                http.HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", "use GET",
                {"Allow": "GET"},
            )  # fmt: skip
        identity = await self._caller(request, tokens_only=True)
        if isinstance(identity, bytes):
            return identity
        document = {
            "sub": identity.subject,
            "role": identity.role.value,
            "exp": identity.expires_at,
        }
        return response(
            http.HTTPStatus.OK,
            json.dumps(document).encode(),
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    async def _cluster_status(self, request: HttpRequest, peer: str) -> bytes:
        server = self.server
        refused = await self._refuse_unless_admin(request, peer)
        if refused is not None:
            return refused
        try:
            report = await asyncio.wait_for(server.cluster_status(), STATUS_TIMEOUT_S)
            body = json.dumps(report).encode()
        except Exception as exc:  # the controller may be restarting; say so
            log.warning("cluster status failed: %s", exc)
            return self.reject(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "unavailable", "cluster status unavailable"
            )
        return response(http.HTTPStatus.OK, body)
