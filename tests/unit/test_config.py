"""Configuration from the environment: defaults, and bad values named at start-up."""

from __future__ import annotations

import pytest

from sentientedge.config import Config
from sentientedge.errors import ConfigError


def test_defaults_follow_the_protocol():
    config = Config.from_env({})
    assert config.port == 4000
    assert config.max_connections_per_drone == 5
    assert config.max_connections_per_user == 10
    assert config.message_queue_size == 1000
    assert config.rate_limit_max == 100
    assert config.drone_rate_hz == 100
    assert config.max_frame_bytes == 65536
    assert config.session_ttl == 300
    assert config.redis_url is None


def test_values_are_read():
    config = Config.from_env({"PORT": "4100", "REDIS_URL": "redis://h:1/0", "DRONE_RATE_HZ": "60"})
    assert (config.port, config.redis_url, config.drone_rate_hz) == (4100, "redis://h:1/0", 60)


@pytest.mark.parametrize(
    "name, value",
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("MAX_WS_CONNECTIONS", "0"),
        ("MAX_FRAME_BYTES", "12"),
        ("REDIS_URL", "localhost:6379"),
        ("RAY_NAMESPACE", "has space"),
        ("PING_INTERVAL", "soon"),
    ],
)
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(ConfigError, match=name) as info:
        Config.from_env({name: value})
    assert info.value.variable == name


def test_short_secrets_are_refused():
    # The design's placeholders are 16-31 characters: an HS256 secret must be 32 bytes or more.
    for name, other in (("JWT_SECRET", "API_KEY_SECRET"), ("API_KEY_SECRET", "JWT_SECRET")):
        short = "placeholder-secret-31-chars-xyz"
        with pytest.raises(ConfigError, match=name) as info:
            Config.from_env({name: short, other: "x" * 32}).require_secrets()
        assert short not in str(info.value)
    with pytest.raises(ConfigError, match="JWT_PREVIOUS_SECRET"):
        Config.from_env(
            {"JWT_SECRET": "x" * 32, "API_KEY_SECRET": "y" * 32, "JWT_PREVIOUS_SECRET": "old"}
        ).require_secrets()
    verifier = Config.from_env(
        {
            "JWT_SECRET": "x" * 32,
            "API_KEY_SECRET": "y" * 32,
            "JWT_PREVIOUS_SECRET": "z" * 32,
            "JWT_ISSUER": "se",
            "JWT_MAX_TTL": "3600",
        }
    ).verifier
    assert verifier.jwt_secrets == ("x" * 32, "z" * 32) and verifier.api_key_secrets == ("y" * 32,)
    assert (verifier.issuer, verifier.audience, verifier.max_ttl_s) == ("se", None, 3600.0)


def test_the_local_ray_token_is_made_once_and_private(tmp_path):
    from sentientedge import state

    config = Config(state_dir=str(tmp_path))
    assert state.ray_auth_env(config) == {}
    env = state.ray_auth_env(config, create=True)
    path = tmp_path / state.RAY_TOKEN_FILE
    assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}
    assert path.stat().st_mode & 0o777 == 0o600
    token = path.read_text()
    assert len(token) == 64
    assert state.ray_auth_env(config, create=True) == env and path.read_text() == token


def test_urls_are_printed_without_their_password():
    from sentientedge.config import redact_url

    assert redact_url("redis://:s3cr%2Ft@10.0.0.5:6380/0") == "redis://:***@10.0.0.5:6380/0"
    assert redact_url("rediss://app:pw@redis.example:6379") == "rediss://app:***@redis.example:6379"
    assert redact_url("redis://127.0.0.1:6380/0") == "redis://127.0.0.1:6380/0"


def test_the_embedded_redis_has_a_password_and_private_files(tmp_path):
    from sentientedge.embedded_redis import EmbeddedRedis, primary_address

    config = Config(state_dir=str(tmp_path), embedded_redis_port=6399)
    embedded = EmbeddedRedis.for_config(config)
    assert embedded.password and embedded.password in embedded.url
    assert embedded.password not in embedded.shown_url
    assert embedded.url.endswith("@127.0.0.1:6399/0")
    assert EmbeddedRedis.for_config(config).password == embedded.password  # made once
    conf = embedded._write_conf()
    assert f"requirepass {embedded.password}" in conf.read_text()
    assert "bind 127.0.0.1" in conf.read_text()
    assert conf.stat().st_mode & 0o777 == 0o600
    assert embedded.dir.stat().st_mode & 0o777 == 0o700
    everywhere = EmbeddedRedis.for_config(config.replace(embedded_redis_host="0.0.0.0"))
    assert "bind 0.0.0.0" in everywhere._write_conf().read_text()
    # Other nodes reach it at this machine's address on its default route.
    assert everywhere.url.endswith(f"@{primary_address()}:6399/0")


def test_a_node_label_gives_that_nodes_ingresses_their_own_port():
    config = Config.from_env({})
    assert config.for_node({}).port == config.port
    assert config.for_node({"sentientedge/port": "4101", "other": "x"}).port == 4101
    with pytest.raises(ConfigError, match="sentientedge/port"):
        config.for_node({"sentientedge/port": "80000"})


def test_redis_cluster_and_replicas_to_wait_for():
    assert Config.from_env({}).redis_cluster is None  # asked at `up`
    assert Config.from_env({"REDIS_CLUSTER": "true"}).redis_cluster is True
    assert Config.from_env({}).redis_wait_replicas is None
    assert Config.from_env({"REDIS_WAIT_REPLICAS": "0"}).redis_wait_replicas == 0
    with pytest.raises(ConfigError, match="REDIS_CLUSTER"):
        Config.from_env({"REDIS_CLUSTER": "maybe"})
    with pytest.raises(ConfigError, match="REDIS_WAIT_REPLICAS"):
        Config.from_env({"REDIS_WAIT_REPLICAS": "-1"})


def test_archive_settings_are_checked_at_start_up():
    config = Config.from_env(
        {"DATABASE_URL": "postgresql://router:pw@127.0.0.1:6432/se", "ARCHIVE_TELEMETRY": "5hz"}
    )
    assert config.archive_telemetry == "5hz" and config.db_pool_size == 4
    assert "pw" not in repr(config)
    for name, value in (("DATABASE_URL", "mysql://x"), ("ARCHIVE_TELEMETRY", "fast")):
        with pytest.raises(ConfigError, match=name):
            Config.from_env({name: value})
