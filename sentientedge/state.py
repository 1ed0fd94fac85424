"""Files the CLI keeps in the state directory (``STATE_DIR``).

- ``secrets.env``: ``JWT_SECRET`` and ``API_KEY_SECRET``, created on first use (mode 0600), so
  the router, ``keys`` and ``token`` agree without the operator inventing secrets; after
  ``secrets rotate`` also the previous ones (still verifying) and ``LINK_SECRET``.
- ``router.json``: what ``up`` started (Ray, embedded Redis) so ``down`` stops exactly that.
- ``redis/``: the embedded Redis's configuration, append-only file and log.
- ``ray_auth_token``: the token of the Ray cluster ``up`` starts (Ray's token authentication,
  mode 0600); every command that reaches that cluster presents it.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from sentientedge.config import Config
from sentientedge.errors import ConfigError

SECRETS_FILE = "secrets.env"
ROUTER_FILE = "router.json"
RAY_TOKEN_FILE = "ray_auth_token"


# The secrets the router keeps in secrets.env when the environment does not set them.
_ROTATED = ("JWT_SECRET", "API_KEY_SECRET")
# What may be missing (None): the previous secrets once retired, the stream key until pinned.
_OPTIONAL_FIELDS = {
    "JWT_PREVIOUS_SECRET": "jwt_previous_secret",
    "API_KEY_PREVIOUS_SECRET": "api_key_previous_secret",
    "LINK_SECRET": "link_secret",
}


def ensure_secrets(config: Config) -> Config:
    """Fill in secrets missing from the environment from ``secrets.env``, creating it if needed."""
    if config.jwt_secret and config.api_key_secret:
        return config
    stored = _stored_secrets(config, *_ROTATED)
    if config.jwt_secret or config.api_key_secret:  # half in the environment: it is rotated there
        return config.replace(
            jwt_secret=config.jwt_secret or stored["JWT_SECRET"],
            api_key_secret=config.api_key_secret or stored["API_KEY_SECRET"],
        )
    return with_stored_secrets(config.replace(secrets_file=str(_secrets_path(config))), stored)


def with_stored_secrets(config: Config, stored: dict[str, str] | None = None) -> Config:
    """``config`` with every secret ``secrets.env`` holds now (after a rotation, say), for a
    config whose secrets came from there (``secrets_file``); otherwise unchanged."""
    if config.secrets_file is None:
        return config
    if stored is None:
        stored = _read_env_file(Path(config.secrets_file))
    return config.replace(
        jwt_secret=stored.get("JWT_SECRET") or config.jwt_secret,
        api_key_secret=stored.get("API_KEY_SECRET") or config.api_key_secret,
        **{field: stored.get(name) or None for name, field in _OPTIONAL_FIELDS.items()},
    )


def rotate_secrets(config: Config) -> list[str]:
    """New ``JWT_SECRET`` and ``API_KEY_SECRET`` in ``secrets.env``; the current ones become
    the ``*_PREVIOUS_SECRET`` that still verify until :func:`retire_secrets`. The stream key
    stays what it was (``LINK_SECRET``). Returns the names written."""
    path = _owned_secrets_file(config)
    stored = _read_env_file(path)
    stored.setdefault("LINK_SECRET", stored["JWT_SECRET"])
    for name in _ROTATED:
        stored[name.replace("_SECRET", "_PREVIOUS_SECRET")] = stored[name]
        stored[name] = secrets.token_urlsafe(32)
    _write_env_file(path, stored)
    return [*_ROTATED, "JWT_PREVIOUS_SECRET", "API_KEY_PREVIOUS_SECRET"]


def retire_secrets(config: Config) -> list[str]:
    """Forget the previous secrets: credentials signed with them stop working."""
    path = _owned_secrets_file(config)
    stored = _read_env_file(path)
    gone: list[str] = [n for n in ("JWT_PREVIOUS_SECRET", "API_KEY_PREVIOUS_SECRET") if n in stored]
    for name in gone:
        del stored[name]
    _write_env_file(path, stored)
    return gone


def _owned_secrets_file(config: Config) -> Path:
    if config.secrets_file is None:
        raise ConfigError(
            "JWT_SECRET",
            "<hidden>",
            "is set in the environment: rotate it there (the old value as JWT_PREVIOUS_SECRET, "
            "likewise API_KEY_SECRET), then `sentientedge restart`",
        )
    return Path(config.secrets_file)


def _secrets_path(config: Config) -> Path:
    return Path(config.state_dir) / SECRETS_FILE


def embedded_redis_password(config: Config) -> str:
    """The embedded Redis's password (``requirepass``), made once in ``secrets.env``."""
    return _stored_secrets(config, "EMBEDDED_REDIS_PASSWORD")["EMBEDDED_REDIS_PASSWORD"]


def _stored_secrets(config: Config, *names: str) -> dict[str, str]:
    """``secrets.env``, with any of ``names`` it lacked generated and written (mode 0600)."""
    path = _secrets_path(config)
    stored = _read_env_file(path)
    missing = [name for name in names if not stored.get(name)]
    for name in missing:
        stored[name] = secrets.token_urlsafe(32)
    if missing:
        _write_env_file(path, stored)
    return stored


def _write_env_file(path: Path, values: dict[str, str]) -> None:
    """Replace ``path`` at once (a reader sees the old file or the new, never half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.writelines(f"{k}={v}\n" for k, v in values.items())
    os.replace(temporary, path)


def ray_auth_env(config: Config, *, create: bool = False) -> dict[str, str]:
    """The environment that turns on Ray's token authentication with the local cluster's token
    (created with ``create``), or nothing when there is no token."""
    path = Path(config.state_dir) / RAY_TOKEN_FILE
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    if not path.exists():
        return {}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def _read_env_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    values = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not name.startswith("#"):
            values[name.strip()] = value.strip()
    return values


@dataclass
class RouterRecord:
    namespace: str
    port: int
    redis_url: str
    embedded_redis: bool
    started_ray: bool
    ray_address: str | None


def _router_path(config: Config) -> Path:
    return Path(config.state_dir) / f"{config.ray_namespace}.{ROUTER_FILE}"


def save_router(config: Config, record: RouterRecord) -> None:
    path = _router_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Its Redis URL carries the embedded Redis's password.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(asdict(record), indent=2) + "\n")
    path.chmod(0o600)


def load_router(config: Config) -> RouterRecord | None:
    path = _router_path(config)
    if not path.exists():
        return None
    return RouterRecord(**json.loads(path.read_text()))


def forget_router(config: Config) -> None:
    _router_path(config).unlink(missing_ok=True)
