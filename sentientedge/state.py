"""Files the CLI keeps in the state directory (``STATE_DIR``).

- ``secrets.env``: ``JWT_SECRET`` and ``API_KEY_SECRET``, created on first use (mode 0600), so
  the router, ``keys`` and ``token`` agree without the operator inventing secrets.
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

SECRETS_FILE = "secrets.env"
ROUTER_FILE = "router.json"
RAY_TOKEN_FILE = "ray_auth_token"


def ensure_secrets(config: Config) -> Config:
    """Fill in secrets missing from the environment from ``secrets.env``, creating it if needed."""
    if config.jwt_secret and config.api_key_secret:
        return config
    stored = _stored_secrets(config, "JWT_SECRET", "API_KEY_SECRET")
    return config.replace(
        jwt_secret=config.jwt_secret or stored["JWT_SECRET"],
        api_key_secret=config.api_key_secret or stored["API_KEY_SECRET"],
    )


def embedded_redis_password(config: Config) -> str:
    """The embedded Redis's password (``requirepass``), made once in ``secrets.env``."""
    return _stored_secrets(config, "EMBEDDED_REDIS_PASSWORD")["EMBEDDED_REDIS_PASSWORD"]


def _stored_secrets(config: Config, *names: str) -> dict[str, str]:
    """``secrets.env``, with any of ``names`` it lacked generated and written (mode 0600)."""
    path = Path(config.state_dir) / SECRETS_FILE
    stored = _read_env_file(path)
    missing = [name for name in names if not stored.get(name)]
    for name in missing:
        stored[name] = secrets.token_urlsafe(32)
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.writelines(f"{k}={v}\n" for k, v in stored.items())
    return stored


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
