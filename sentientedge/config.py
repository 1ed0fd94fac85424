"""The router's configuration: one frozen object, read from the environment here and only here.

Rules for this module:
- Every setting has the variable name of the design (``PORT``, ``REDIS_URL``, ...).
- A bad value raises :class:`ConfigError` naming the variable, at start-up.
- The object is passed to the actors as an argument; they never read the environment.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from sentientedge.archive import TelemetryPolicy
from sentientedge.auth import Verifier
from sentientedge.autoscale import ScalingPolicy
from sentientedge.errors import ConfigError
from sentientedge.forwarded import Network, parse_networks
from sentientedge.records import Retention
from sentientedge.sealing import KeyRing

T = TypeVar("T")

NODE_PORT_LABEL = "sentientedge/port"  # a Ray node label: this node's ingresses' port


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "sentientedge")


@dataclass(frozen=True)
class Config:
    # Network
    host: str = "0.0.0.0"
    port: int = 4000
    use_https: bool = False  # wss:// and https:// on PORT, with TLS_CERT_FILE / TLS_KEY_FILE
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_min_version: str = "1.3"  # TLS_MIN_VERSION=1.2 lets older clients in, explicitly
    server_id: str = "se"
    # Limits (PROTOCOL.md, "Identity" and "Delivery")
    max_ws_connections: int = 10_000
    max_connections_per_drone: int = 5
    max_connections_per_user: int = 10
    message_queue_size: int = 1000
    rate_limit_max: int = 100
    drone_rate_hz: int = 100
    max_frame_bytes: int = 65_536
    session_ttl: int = 300
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    # Bounds per identity (a stolen credential cannot fill Redis or a shard)
    max_subscriptions: int = 100  # per connection
    max_retained_per_drone: int = 100  # retained topics one drone may hold
    session_queue_max: int = 10_000  # QoS 1 messages kept for one session
    max_commands_per_drone: int = 1000  # commands queued for one drone
    max_bytes_per_s: int = 1_048_576  # per connection, frames in
    # Load balancers whose X-Forwarded-For is believed (forwarded.py): addresses or networks.
    trusted_proxies: str = ""
    handshake_rate: float = 50.0  # WebSocket handshakes per second per client address, burst 5x
    # QoS 1 (sentientedge/store.py, sentientedge/delivery.py)
    max_unacked: int = 1000
    stream_max_len: int = 100_000
    stream_max_age_s: int = 86_400
    dedupe_ttl_s: int = 900
    redis_appendfsync: str = "everysec"
    # Stores and secrets
    redis_url: str | None = None
    # REDIS_URL a Redis Cluster node? None: ask it (INFO cluster) at `up`
    redis_cluster: bool | None = None
    # QoS 1 acknowledged once this many replicas have it (WAIT). None: 1 on a cluster whose
    # master has a replica, else 0
    redis_wait_replicas: int | None = None
    redis_wait_timeout_ms: int = 1000
    # Flight history in PostgreSQL (sentientedge/database.py): off without DATABASE_URL
    database_url: str | None = None
    archive_telemetry: str = "all"  # all, none, or a rate per telemetry topic ("10hz")
    archive_retention_days: int = 30  # daily partitions older than this are dropped; 0: keep
    db_pool_size: int = 4  # PostgreSQL connections per router process, at most
    archive_buffer_max: int = 100_000  # rows waiting per shard; QoS 0 ones dropped past it
    jwt_secret: str | None = None
    api_key_secret: str | None = None
    # Rotation: the previous secrets still verify until they are retired (`secrets retire`)
    jwt_previous_secret: str | None = None
    api_key_previous_secret: str | None = None
    # The key of the streams between router processes; it stays when JWT_SECRET is rotated
    # (`secrets rotate` pins it to the secret the running processes derived it from).
    link_secret: str | None = None
    secrets_file: str | None = None  # where secrets not in the environment came from (state.py)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_max_ttl: int = 86_400  # seconds; a token living longer (exp - iat) is refused
    admin_mfa: str = "required"  # or "off": admin tokens need amr "otp" on admin endpoints
    admin_token_ttl: int = 900  # seconds, for tokens minted by POST /auth/token
    encryption_key: str | None = None  # AES-256-GCM for everything stored (sealing.py)
    audit_log: str | None = None  # default STATE_DIR/audit.log; "-" for standard error
    log_level: str = "info"  # of every router process (JSON lines, sentientedge/logs.py)
    embedded_redis_maxmemory: str = "2gb"  # with noeviction: QoS 1 data is never evicted
    # Cluster
    ray_namespace: str = "sentientedge"
    # Scaling (sentientedge/autoscale.py): an instance is one ingress and one shard
    autoscale: bool = True
    actor_cpus: float = 0.5  # CPUs each ingress and shard asks Ray for
    min_instances: int = 2
    max_instances: int = 20
    scale_up_threshold: float = 0.8
    scale_down_threshold: float = 0.3
    scale_up_cooldown_ms: int = 300_000
    scale_down_cooldown_ms: int = 600_000
    scale_window_ms: int = 60_000
    state_dir: str = dataclasses.field(default_factory=_default_state_dir)
    embedded_redis_port: int = 6380
    embedded_redis_host: str = "127.0.0.1"  # 0.0.0.0: every node of a cluster reaches it

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    def __post_init__(self) -> None:
        if self.use_https:
            for name, value in (
                ("TLS_CERT_FILE", self.tls_cert_file),
                ("TLS_KEY_FILE", self.tls_key_file),
            ):
                if not value:
                    raise ConfigError(name, value, "must be set when USE_HTTPS is true")

        try:
            parse_networks(self.trusted_proxies)
        except ValueError as exc:
            raise ConfigError("TRUSTED_PROXIES", self.trusted_proxies, str(exc)) from None
        if self.encryption_key:
            self.key_ring  # noqa: B018 -- a bad key is a start-up error, not a first-write one
        if self.min_instances > self.max_instances:
            raise ConfigError("MIN_INSTANCES", str(self.min_instances), "exceeds MAX_INSTANCES")
        if self.scale_down_threshold >= self.scale_up_threshold:
            raise ConfigError(
                "SCALE_DOWN_THRESHOLD",
                str(self.scale_down_threshold),
                "must be below SCALE_UP_THRESHOLD",
            )

    @property
    def scaling_policy(self) -> ScalingPolicy:
        return ScalingPolicy(
            min_instances=self.min_instances,
            max_instances=self.max_instances,
            up_threshold=self.scale_up_threshold,
            down_threshold=self.scale_down_threshold,
            up_cooldown_s=self.scale_up_cooldown_ms / 1000,
            down_cooldown_s=self.scale_down_cooldown_ms / 1000,
        )

    @property
    def scheme(self) -> str:
        return "wss" if self.use_https else "ws"

    def require_secrets(self) -> None:
        """Raise unless both secrets are set; the ingress cannot authenticate without them."""
        for name, value in (
            ("JWT_SECRET", self.jwt_secret),
            ("API_KEY_SECRET", self.api_key_secret),
            ("JWT_PREVIOUS_SECRET", self.jwt_previous_secret or "x" * MIN_SECRET_BYTES),
            ("API_KEY_PREVIOUS_SECRET", self.api_key_previous_secret or "x" * MIN_SECRET_BYTES),
            ("LINK_SECRET", self.link_secret or "x" * MIN_SECRET_BYTES),
        ):
            if not value:
                raise ConfigError(name, value, "must be set")
            if len(value.encode()) < MIN_SECRET_BYTES:
                raise ConfigError(
                    name, "<hidden>", f"must be at least {MIN_SECRET_BYTES} bytes (32 random)"
                )

    @property
    def trusted_networks(self) -> tuple[Network, ...]:
        return parse_networks(self.trusted_proxies)

    @property
    def stream_secret(self) -> str:
        """What the streams between router processes derive their key from (wire.py)."""
        secret = self.link_secret or self.jwt_secret
        assert secret is not None
        return secret

    @property
    def key_ring(self) -> KeyRing | None:
        """The keys that seal what the router stores (``ENCRYPTION_KEY``), or None."""
        if not self.encryption_key:
            return None
        try:
            return KeyRing.from_setting(self.encryption_key)
        except ValueError as exc:  # its message names the setting, never the key
            raise ConfigError("ENCRYPTION_KEY", "<hidden>", str(exc)) from None

    @property
    def verifier(self) -> Verifier:
        """What checks credentials: current secrets first, then those being retired."""
        self.require_secrets()
        assert self.jwt_secret is not None and self.api_key_secret is not None
        return Verifier(
            jwt_secrets=tuple(s for s in (self.jwt_secret, self.jwt_previous_secret) if s),
            api_key_secrets=tuple(
                s for s in (self.api_key_secret, self.api_key_previous_secret) if s
            ),
            issuer=self.jwt_issuer,
            audience=self.jwt_audience,
            max_ttl_s=float(self.jwt_max_ttl),
        )

    @property
    def retention(self) -> Retention:
        return Retention(
            stream_max_len=self.stream_max_len,
            stream_max_age_s=self.stream_max_age_s,
            dedupe_ttl_s=self.dedupe_ttl_s,
            session_ttl_s=self.session_ttl,
            command_max_len=self.max_commands_per_drone,
            session_queue_max=self.session_queue_max,
        )

    def __repr__(self) -> str:
        """Names of the secrets, never their values: a config may end up in a log line."""
        shown = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and field.name.endswith(("secret", "_key", "_url", "password")):
                value = redact_url(value) if field.name.endswith("_url") else "***"
            shown.append(f"{field.name}={value!r}")
        return f"Config({', '.join(shown)})"

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def for_node(self, labels: Mapping[str, str]) -> Config:
        """The configuration an ingress on a node with these Ray labels serves with.

        A node labelled ``sentientedge/port=N`` serves on port N instead of ``PORT``: several
        router nodes on one host (containers sharing its network, or a test) each get a port a
        load balancer can address, where one shared port would hand connections to either."""
        raw = labels.get(NODE_PORT_LABEL)
        if raw is None:
            return self
        port = _Reader({NODE_PORT_LABEL: raw}).integer(NODE_PORT_LABEL, self.port, 1, 65535)
        return self.replace(port=port)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Build the configuration from ``env`` (default: ``os.environ``)."""
        env = os.environ if env is None else env
        reader = _Reader(env)
        default = cls()
        return cls(
            host=reader.text("HOST", default.host),
            port=reader.integer("PORT", default.port, low=1, high=65535),
            use_https=reader.flag("USE_HTTPS", default.use_https),
            tls_cert_file=reader.optional("TLS_CERT_FILE", _check_readable),
            tls_key_file=reader.optional("TLS_KEY_FILE", _check_readable),
            tls_min_version=reader.choice(
                "TLS_MIN_VERSION", default.tls_min_version, ("1.2", "1.3")
            ),
            server_id=reader.text("SERVER_ID", default.server_id, pattern_chars=_ID_CHARS),
            max_ws_connections=reader.integer(
                "MAX_WS_CONNECTIONS", default.max_ws_connections, low=1
            ),
            max_connections_per_drone=reader.integer(
                "MAX_CONNECTIONS_PER_DRONE", default.max_connections_per_drone, low=1
            ),
            max_connections_per_user=reader.integer(
                "MAX_CONNECTIONS_PER_USER", default.max_connections_per_user, low=1
            ),
            message_queue_size=reader.integer(
                "MESSAGE_QUEUE_SIZE", default.message_queue_size, low=1
            ),
            rate_limit_max=reader.integer("RATE_LIMIT_MAX", default.rate_limit_max, low=1),
            drone_rate_hz=reader.integer("DRONE_RATE_HZ", default.drone_rate_hz, low=1),
            max_frame_bytes=reader.integer(
                "MAX_FRAME_BYTES", default.max_frame_bytes, low=256, high=64 * 1024 * 1024
            ),
            session_ttl=reader.integer("SESSION_TTL", default.session_ttl, low=1),
            ping_interval=reader.number("PING_INTERVAL", default.ping_interval, low=0.1),
            ping_timeout=reader.number("PING_TIMEOUT", default.ping_timeout, low=0.1),
            max_subscriptions=reader.integer("MAX_SUBSCRIPTIONS", default.max_subscriptions, low=1),
            max_retained_per_drone=reader.integer(
                "MAX_RETAINED_PER_DRONE", default.max_retained_per_drone, low=1
            ),
            session_queue_max=reader.integer("SESSION_QUEUE_MAX", default.session_queue_max, low=1),
            max_commands_per_drone=reader.integer(
                "MAX_COMMANDS_PER_DRONE", default.max_commands_per_drone, low=1
            ),
            max_bytes_per_s=reader.integer("MAX_BYTES_PER_S", default.max_bytes_per_s, low=1024),
            handshake_rate=reader.number("HANDSHAKE_RATE", default.handshake_rate, low=0.1),
            trusted_proxies=reader.text("TRUSTED_PROXIES", default.trusted_proxies),
            max_unacked=reader.integer("MAX_UNACKED", default.max_unacked, low=1),
            stream_max_len=reader.integer("STREAM_MAX_LEN", default.stream_max_len, low=1),
            stream_max_age_s=reader.integer("STREAM_MAX_AGE_S", default.stream_max_age_s, low=0),
            # PROTOCOL.md: a repeated id is recognised "within at least 10 minutes".
            dedupe_ttl_s=reader.integer("DEDUPE_TTL_S", default.dedupe_ttl_s, low=600),
            redis_appendfsync=reader.choice(
                "REDIS_APPENDFSYNC", default.redis_appendfsync, ("always", "everysec", "no")
            ),
            redis_url=reader.optional("REDIS_URL", _check_redis_url),
            redis_cluster={"auto": None, "true": True, "false": False}[
                reader.choice("REDIS_CLUSTER", "auto", ("auto", "true", "false"))
            ],
            redis_wait_replicas=(
                None
                if reader.optional("REDIS_WAIT_REPLICAS") is None
                else reader.integer("REDIS_WAIT_REPLICAS", 0, low=0, high=16)
            ),
            redis_wait_timeout_ms=reader.integer(
                "REDIS_WAIT_TIMEOUT_MS", default.redis_wait_timeout_ms, low=10, high=60_000
            ),
            database_url=reader.optional("DATABASE_URL", _check_database_url),
            archive_telemetry=_telemetry_policy(
                reader.text("ARCHIVE_TELEMETRY", default.archive_telemetry)
            ),
            archive_retention_days=reader.integer(
                "ARCHIVE_RETENTION_DAYS", default.archive_retention_days, low=0
            ),
            db_pool_size=reader.integer("DB_POOL_SIZE", default.db_pool_size, low=1, high=1000),
            archive_buffer_max=reader.integer(
                "ARCHIVE_BUFFER_MAX", default.archive_buffer_max, low=1
            ),
            jwt_secret=reader.optional("JWT_SECRET"),
            api_key_secret=reader.optional("API_KEY_SECRET"),
            jwt_previous_secret=reader.optional("JWT_PREVIOUS_SECRET"),
            api_key_previous_secret=reader.optional("API_KEY_PREVIOUS_SECRET"),
            link_secret=reader.optional("LINK_SECRET"),
            jwt_issuer=reader.optional("JWT_ISSUER"),
            jwt_audience=reader.optional("JWT_AUDIENCE"),
            jwt_max_ttl=reader.integer("JWT_MAX_TTL", default.jwt_max_ttl, low=60),
            admin_mfa=reader.choice("ADMIN_MFA", default.admin_mfa, ("required", "off")),
            admin_token_ttl=reader.integer(
                "ADMIN_TOKEN_TTL", default.admin_token_ttl, low=60, high=86_400
            ),
            encryption_key=reader.optional("ENCRYPTION_KEY"),
            audit_log=reader.optional("AUDIT_LOG"),
            log_level=reader.choice(
                "LOG_LEVEL", default.log_level, ("debug", "info", "warning", "error")
            ),
            embedded_redis_maxmemory=reader.text(
                "EMBEDDED_REDIS_MAXMEMORY", default.embedded_redis_maxmemory
            ),
            ray_namespace=reader.text(
                "RAY_NAMESPACE", default.ray_namespace, pattern_chars=_ID_CHARS
            ),
            state_dir=reader.text("STATE_DIR", default.state_dir),
            autoscale=reader.flag("AUTOSCALE", default.autoscale),
            actor_cpus=reader.number("ACTOR_CPUS", default.actor_cpus, low=0.0),
            min_instances=reader.integer("MIN_INSTANCES", default.min_instances, low=1),
            max_instances=reader.integer("MAX_INSTANCES", default.max_instances, low=1),
            scale_up_threshold=reader.number(
                "SCALE_UP_THRESHOLD", default.scale_up_threshold, low=0.0
            ),
            scale_down_threshold=reader.number(
                "SCALE_DOWN_THRESHOLD", default.scale_down_threshold, low=0.0
            ),
            scale_up_cooldown_ms=reader.integer(
                "SCALE_UP_COOLDOWN", default.scale_up_cooldown_ms, low=0
            ),
            scale_down_cooldown_ms=reader.integer(
                "SCALE_DOWN_COOLDOWN", default.scale_down_cooldown_ms, low=0
            ),
            scale_window_ms=reader.integer("SCALE_WINDOW", default.scale_window_ms, low=100),
            embedded_redis_port=reader.integer(
                "EMBEDDED_REDIS_PORT", default.embedded_redis_port, low=1, high=65535
            ),
            embedded_redis_host=reader.text("EMBEDDED_REDIS_HOST", default.embedded_redis_host),
        )


# An HS256 secret shorter than its hash can be brute-forced offline from one token.
MIN_SECRET_BYTES = 32

_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def _check_readable(value: str) -> str:
    if not os.access(value, os.R_OK):
        raise ValueError("no readable file there")
    return value


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: for printing and logging."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def _check_database_url(value: str) -> str:
    if not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("expected a postgresql:// URL")
    return value


def _telemetry_policy(value: str) -> str:
    """Refused at start-up, not in the shard that would first use it."""
    TelemetryPolicy.parse(value)  # raises ConfigError naming ARCHIVE_TELEMETRY
    return value


def _check_redis_url(value: str) -> str:
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return value


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def text(self, name: str, default: str, pattern_chars: frozenset[str] | None = None) -> str:
        value = self._raw(name)
        if value is None:
            return default
        if pattern_chars is not None and not set(value) <= pattern_chars:
            raise ConfigError(name, value, "may hold only letters, digits, '_', '-' and '.'")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self._raw(name)
        if value is None:
            return default
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, value, "expected true or false")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self._raw(name)
        if value is None:
            return default
        if value not in choices:
            raise ConfigError(name, value, f"must be one of {', '.join(choices)}")
        return value

    def integer(
        self, name: str, default: int, low: int | None = None, high: int | None = None
    ) -> int:
        return self._parse(name, default, int, "an integer", low, high)

    def number(self, name: str, default: float, low: float | None = None) -> float:
        return self._parse(name, default, float, "a number", low, None)

    def _parse(
        self,
        name: str,
        default: T,
        parse: Callable[[str], T],
        kind: str,
        low: float | None,
        high: float | None,
    ) -> T:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = parse(raw)
        except ValueError:
            raise ConfigError(name, raw, f"expected {kind}") from None
        if low is not None and value < low:  # type: ignore[operator]
            raise ConfigError(name, raw, f"must be at least {low}")
        if high is not None and value > high:  # type: ignore[operator]
            raise ConfigError(name, raw, f"must be at most {high}")
        return value

    def optional(self, name: str, check: Callable[[str], str] | None = None) -> str | None:
        raw = self._raw(name)
        if raw is None or check is None:
            return raw
        try:
            return check(raw)
        except ValueError as exc:
            raise ConfigError(name, raw, str(exc)) from None
