"""The ``sentientedge`` command: start, inspect and stop a router; mint credentials; run a demo.

    sentientedge up [--address ADDR] [--ingress N] [--shards M]
    sentientedge status [--json]
    sentientedge down
    sentientedge drain INGRESS [--restart] | restart
    sentientedge keys issue DRONE_ID [--ttl 90d] | keys revoke KEY_OR_ID | keys list
    sentientedge token --role operator --sub NAME --ttl 15m | token revoke TOKEN_OR_JTI
    sentientedge admin add NAME [--password-stdin] | admin remove NAME | admin list
    sentientedge secrets rotate | secrets retire | secrets new-key
    sentientedge lb haproxy|nginx [--out FILE]
    sentientedge history TOPIC [--from WHEN] [--to WHEN] [--limit N]
    sentientedge archive prune [--days N]
    sentientedge demo [--drones N] [--rate HZ] [--duration S]

Configuration comes from the environment (see sentientedge.config); secrets not set there are
kept in ``STATE_DIR/secrets.env``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import getpass
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sentientedge import admins, auth, codec, state, tls
from sentientedge.audit import AuditLog, audit_path
from sentientedge.config import Config, redact_url
from sentientedge.embedded_redis import EmbeddedRedis
from sentientedge.errors import BridgeFailed, ConfigError, SentientEdgeError, StoreUnavailable
from sentientedge.redis_cluster import is_cluster
from sentientedge.store import AdminStore

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` -> seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 30s, 15m, 2h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def default_actor_count() -> int:
    """Half the CPUs for ingresses and half for shards.

    Every actor is a process and every link between two of them costs Ray calls; on a 2-core
    machine one ingress and one shard carry 10,000 msgs/s with room to spare, where 2 and 4
    spend the second core on call overhead (README, "Sizing").
    """
    return max(1, (os.cpu_count() or 2) // 2)


def _config() -> Config:
    return state.ensure_secrets(Config.from_env())


def _audit(config: Config, event: str, **fields: Any) -> None:
    """One line in the audit trail, from this command (who ran it: the OS user)."""
    sink = None
    if config.database_url is not None:
        from sentientedge.database import record_audit

        database_url = config.database_url
        sink = lambda document: record_audit(database_url, document)  # noqa: E731
    trail = AuditLog(audit_path(config.audit_log, config.state_dir), "cli", sink=sink)
    trail.record(event, user=getpass.getuser(), **fields)
    trail.close()


def _settle_redis(config: Config) -> Config:
    """REDIS_CLUSTER and REDIS_WAIT_REPLICAS as the router will run with them: a Redis Cluster
    is recognised (``INFO cluster``), and QoS 1 then waits for a replica when every master has
    one."""
    from sentientedge.redis_cluster import cluster_masters

    assert config.redis_url is not None
    cluster = is_cluster(config.redis_url) if config.redis_cluster is None else config.redis_cluster
    wait = config.redis_wait_replicas
    if cluster:
        masters = cluster_masters(config.redis_url)
        fewest = min(masters.values(), default=0)
        wait = min(1, fewest) if wait is None else wait
        print(
            f"           a Redis Cluster of {len(masters)} masters ({fewest}+ replicas each): "
            f"keys spread by topic and session; QoS 1 acknowledged once {wait} replicas have it"
        )
    return config.replace(redis_cluster=cluster, redis_wait_replicas=wait or 0)


def _admin_store(config: Config) -> AdminStore:
    url = _redis_url(config)
    cluster = config.redis_cluster
    if cluster is None:  # the embedded Redis is never a cluster
        cluster = config.redis_url is not None and is_cluster(url)
    return AdminStore(url, config.ray_namespace, cluster)


def _redis_url(config: Config) -> str:
    if config.redis_url:
        return config.redis_url
    record = state.load_router(config)
    if record is not None:
        return record.redis_url
    return EmbeddedRedis.for_config(config).url


def _ray_address(args_address: str | None, config: Config) -> str | None:
    if args_address:
        return args_address
    record = state.load_router(config)
    if record is not None and record.ray_address:
        return record.ray_address
    _present_local_ray_token(config)
    return "auto"


# What Ray's core prints while this process joins a cluster on a machine with no route to the
# internet (it probes 8.8.8.8 for its own address, then falls back to the host name): nothing
# is wrong, and a laptop in the field is often offline.
_RAY_OFFLINE_NOTE = re.compile(r"network_util\.cc:\d+: Failed to determine local IP via external")


def _join_ray(address: str | None, config: Config) -> None:
    """Connect this process to the Ray cluster at ``address`` as a driver."""
    from actors import ray_api

    with _ray_core_output():
        ray_api.connect(address, config.ray_namespace)


@contextlib.contextmanager
def _ray_core_output() -> Iterator[None]:
    """Ray's core (C++) writes to file descriptor 2, past ``sys.stderr``: caught while the block
    runs, then passed on but for its offline note."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                if not _RAY_OFFLINE_NOTE.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def _present_local_ray_token(config: Config, *, create: bool = False) -> None:
    """The local cluster ``up`` started asks for its token (made here with ``create``); Ray
    reads it from the environment (of this process, and of the ``ray`` commands it runs)."""
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ.update(state.ray_auth_env(config, create=create))


# up / down / status


def cmd_up(args: argparse.Namespace) -> int:
    config = _config()
    config.require_secrets()  # before anything starts: a short secret is a start-up error
    warning = tls.plain_text_warning(config)
    if warning:
        print(warning, file=sys.stderr)
    started_redis = False
    if config.redis_url is None:
        embedded = EmbeddedRedis.for_config(config)
        started_redis = embedded.start()
        config = config.replace(redis_url=embedded.url)
        print(f"redis:     {embedded.shown_url} (embedded, data in {embedded.dir})")
    else:
        print(f"redis:     {redact_url(config.redis_url)}")
        try:
            config = _settle_redis(config)
        except StoreUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    ring = config.key_ring
    if ring is None:
        print(
            "storage:   unencrypted (set ENCRYPTION_KEY to seal stored messages; "
            "`sentientedge secrets new-key` makes one)"
        )
    else:
        print(f"storage:   sealed with AES-256-GCM (key id {ring.current_key_id})")
    started_ray = False
    address = args.address
    if address is None:
        address, started_ray = _start_local_ray(args, config)
    from actors import ray_api

    _join_ray(address, config)
    if ray_api.find_actor(ray_api.CONTROLLER, config.ray_namespace) is not None:
        print(f"a router is already running in Ray namespace {config.ray_namespace!r}")
        return _print_status(config, as_json=False)
    from actors.controller import RouterController
    from actors.ingress import Ingress
    from actors.topic_shard import TopicShard

    roles = ray_api.ActorRoles(ingress=Ingress, shard=TopicShard)
    controller = ray_api.create_controller(
        RouterController, config, args.ingress, args.shards, roles
    )
    deployed = ray_api.call_sync(controller, "deploy", timeout=120)
    previous = state.load_router(config)
    state.save_router(
        config,
        state.RouterRecord(
            namespace=config.ray_namespace,
            port=config.port,
            redis_url=config.redis_url or "",
            embedded_redis=started_redis or bool(previous and previous.embedded_redis),
            started_ray=started_ray or bool(previous and previous.started_ray),
            ray_address=None if args.address in (None, "auto") else args.address,
        ),
    )
    print(f"router:    {len(deployed['ingresses'])} ingress, {len(deployed['shards'])} shards")
    http_scheme = "https" if config.use_https else "http"
    print(
        f"connect:   {config.scheme}://127.0.0.1:{config.port}/ws  "
        f"(health: {http_scheme}://127.0.0.1:{config.port}/health)"
    )
    print(f"console:   {http_scheme}://127.0.0.1:{config.port}/console  (sign in with a token)")
    dashboard = ray_api.dashboard_url()
    if dashboard:
        print(f"dashboard: {dashboard}  (Ray namespace {config.ray_namespace!r})")
    print(
        "keys:      sentientedge keys issue DRONE_ID; sentientedge token --role observer --sub ME"
    )
    return 0


def _start_local_ray(args: argparse.Namespace, config: Config) -> tuple[str, bool]:
    """Use the local Ray cluster if one runs, else start a head node here: bound to loopback,
    its dashboard too, and with Ray's token authentication on (the token in ``STATE_DIR``)."""
    _present_local_ray_token(config, create=True)
    probe = subprocess.run(
        [_ray_binary(), "status"], capture_output=True, text=True, timeout=60, check=False
    )
    if probe.returncode == 0:
        return "auto", False
    print("ray:       starting a local head node ...")
    from actors.ray_api import ROUTER_SYSTEM_CONFIG

    command = [
        _ray_binary(),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--disable-usage-stats",
        f"--system-config={json.dumps(ROUTER_SYSTEM_CONFIG)}",
    ]
    if args.num_cpus is not None:
        command.append(f"--num-cpus={args.num_cpus}")
    # Its output (where its logs are, how to stop it) is Ray's, not the router's: shown only if
    # it fails.
    started = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    if started.returncode != 0:
        raise SentientEdgeError(
            f"`ray start` failed ({started.returncode}):\n{started.stdout}{started.stderr}".rstrip()
        )
    return "auto", True


def _ray_binary() -> str:
    here = shutil.which("ray", path=str(Path(sys.executable).parent))
    return here or shutil.which("ray") or "ray"


def cmd_status(args: argparse.Namespace) -> int:
    config = _config()
    _connect(args.address, config)
    return _print_status(config, as_json=args.json)


def _connect(args_address: str | None, config: Config) -> None:
    address = _ray_address(args_address, config)  # before Ray is imported
    _join_ray(address, config)


def _running_controller(args_address: str | None, config: Config) -> Any:
    """Connect to the router's Ray cluster and find its controller (None: said on stderr)."""
    _connect(args_address, config)
    return _controller(config)


def _controller(config: Config) -> Any:
    """The running router's controller, or None (said on stderr)."""
    from actors import ray_api

    controller = ray_api.find_actor(ray_api.CONTROLLER, config.ray_namespace)
    if controller is None:
        print(f"no router running in Ray namespace {config.ray_namespace!r}", file=sys.stderr)
    return controller


def _print_status(config: Config, *, as_json: bool) -> int:
    from actors import ray_api

    controller = _controller(config)
    if controller is None:
        return 1
    status = ray_api.call_sync(controller, "cluster_status", timeout=30)
    if as_json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    print(
        f"namespace {status['namespace']}: {status['connections']} connections, "
        f"{status['drones_online']} drones online, {status['sessions']} sessions"
    )
    for node_id, node in status.get("nodes", {}).items():
        if node["alive"] or node["ingresses"] or node["shards"]:
            print(
                f"  node {node_id[:12]} {node.get('address')}  "
                f"{'alive' if node['alive'] else 'DEAD'}  {node['connections']} connections  "
                f"cpu {node.get('cpu', 0):.2f}  "
                f"{', '.join(node['ingresses'] + node['shards']) or 'no router actors'}"
            )
    for name, info in status["ingresses"].items():
        if "error" in info:
            print(f"  {name:<12} DOWN  {info['error']}")
        else:
            print(
                f"  {name:<12} node {info.get('node', '?')[:12]}  port {info.get('port')}  "
                f"{info.get('connections', 0)} connections  {info.get('delivered', 0)} delivered"
            )
    for name, info in status["shards"].items():
        if "error" in info:
            print(f"  {name:<12} DOWN  {info['error']}")
        else:
            print(
                f"  {name:<12} node {info.get('node', '?')[:12]}  "
                f"{info.get('filters', 0)} filters  "
                f"{info.get('routed', 0)} routed  {info.get('drones_online', 0)} drones online"
            )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    config = _config()
    record = state.load_router(config)
    address = _ray_address(args.address, config)  # before Ray is imported
    from actors import ray_api

    try:
        _join_ray(address, config)
    except ConnectionError:
        print("no Ray cluster running")
    else:
        controller = ray_api.find_actor(ray_api.CONTROLLER, config.ray_namespace)
        if controller is not None:
            ray_api.call_sync(controller, "shutdown", timeout=60)
            ray_api.kill(controller)
            print(f"router in Ray namespace {config.ray_namespace!r} stopped")
        else:
            print(f"no router running in Ray namespace {config.ray_namespace!r}")
    # Off the cluster before `ray stop`: a driver still attached is sent the traceback of every
    # Ray process the stop ends (the autoscaler's "Terminated with signal 15").
    ray_api.disconnect()
    if record is not None and record.embedded_redis:
        EmbeddedRedis.for_config(config).stop()
        print("embedded redis stopped")
    if record is not None and record.started_ray:
        stopped = subprocess.run(
            [_ray_binary(), "stop"], capture_output=True, text=True, check=False, timeout=120
        )
        if stopped.returncode != 0:
            print(
                f"error: `ray stop` failed ({stopped.returncode}):\n"
                f"{stopped.stdout}{stopped.stderr}".rstrip(),
                file=sys.stderr,
            )
            return 1
        print("local ray stopped")
    state.forget_router(config)
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    config = _config()
    controller = _running_controller(args.address, config)
    if controller is None:
        return 1
    from actors import ray_api

    if args.command == "restart":
        _audit(config, "restart")
        reports = ray_api.call_sync(controller, "rolling_restart", timeout=600)
    else:
        _audit(config, "drain", ingress=args.ingress, restart=args.restart)
        reports = [ray_api.call_sync(controller, "drain", args.ingress, args.restart, timeout=300)]
    for report in reports:
        print(
            f"{report['ingress']}: {report['closed']} connections closed with 1012"
            + (f", {report['left']} still open" if report["left"] else "")
        )
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    config = _config()
    controller = _running_controller(args.address, config)
    if controller is None:
        return 1
    from actors import ray_api

    change = args.instances if args.direction == "up" else -args.instances
    answer = ray_api.call_sync(controller, "request_scaling", change, timeout=60)
    _audit(
        config,
        "scale",
        change=change,
        outcome="refused" if "refused" in answer else "accepted",
        reason=answer.get("refused"),
        target=answer.get("target"),
    )
    if "refused" in answer:
        print(f"refused: {answer['refused']}", file=sys.stderr)
        return 1
    print(f"scaling {answer['instances']} -> {answer['target']} instances")
    if args.no_wait:
        return 0
    events = ray_api.call_sync(controller, "wait_scaled", timeout=660)
    last = events[-1] if events else {}
    print(f"{last.get('status', 'unknown')} in {last.get('took_s', '?')} s")
    return 0 if last.get("status") == "done" else 1


# keys / token


def cmd_keys(args: argparse.Namespace) -> int:
    config = _config()
    assert config.api_key_secret is not None
    store = _admin_store(config)
    if args.keys_command == "issue":
        key = auth.issue_api_key(config.api_key_secret, args.drone_id, ttl_s=args.ttl)
        try:
            store.record_issued(key.key_id, key.drone_id, key.expires_at)
        except StoreUnavailable:
            print("warning: redis unreachable, key not listed (it still works)", file=sys.stderr)
        _audit(
            config, "key_issued", key_id=key.key_id, drone=key.drone_id, expires_at=key.expires_at
        )
        print(key.key)
        return 0
    if args.keys_command == "revoke":
        key_id = args.key
        if "." in key_id:  # the key itself
            key_id = auth.parse_api_key(key_id).key_id
        newly = store.revoke(key_id)
        _audit(config, "key_revoked", key_id=key_id, newly=newly)
        print(f"revoked {key_id}" if newly else f"{key_id} was already revoked")
        return 0
    revoked = store.revoked()
    for key_id, record in sorted(store.issued().items()):
        mark = "revoked" if key_id in revoked else "active"
        print(f"{key_id}  {record['drone']:<24} {mark}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    config = _config()
    assert config.jwt_secret is not None
    if args.token_command == "revoke":
        return _revoke_token(config, args.token)
    if args.role is None or args.sub is None:
        print(
            "error: token needs --role and --sub (or: token revoke TOKEN_OR_JTI)", file=sys.stderr
        )
        return 2
    if args.ttl > config.jwt_max_ttl:
        print(
            f"error: --ttl {args.ttl:.0f} s exceeds JWT_MAX_TTL ({config.jwt_max_ttl} s): "
            "the router would refuse the token",
            file=sys.stderr,
        )
        return 2
    if args.role == auth.Role.ADMIN.value and config.admin_mfa != "off":
        print(
            "error: admin tokens come from POST /auth/token with a second factor "
            "(enrol with `sentientedge admin add NAME`); ADMIN_MFA=off allows minting them here",
            file=sys.stderr,
        )
        return 2
    acl = None
    if args.acl_pub is not None or args.acl_sub is not None:
        acl = {}
        if args.acl_pub is not None:
            acl["pub"] = args.acl_pub
        if args.acl_sub is not None:
            acl["sub"] = args.acl_sub
    token = auth.mint_jwt(
        config.jwt_secret,
        args.sub,
        args.role,
        args.ttl,
        acl=acl,
        issuer=config.jwt_issuer,
        audience=config.jwt_audience,
    )
    jti = auth.token_claims_unverified(token)["jti"]
    _audit(config, "token_minted", sub=args.sub, role=args.role, jti=jti, ttl_s=args.ttl)
    print(token)
    return 0


def _revoke_token(config: Config, token_or_jti: str) -> int:
    if "." in token_or_jti:  # the token itself: revoked until it would have expired
        claims = auth.token_claims_unverified(token_or_jti)
        jti, expires_at = claims.get("jti"), claims.get("exp")
        if not isinstance(jti, str) or not isinstance(expires_at, (int, float)):
            print("error: that token has no jti or exp: it cannot be revoked", file=sys.stderr)
            return 1
    else:  # a bare jti: kept as long as the longest token could live
        jti, expires_at = token_or_jti, time.time() + config.jwt_max_ttl
    store = _admin_store(config)
    newly = store.revoke_token(jti, float(expires_at))
    _audit(config, "token_revoked", jti=jti, newly=newly)
    print(f"revoked token {jti}" if newly else f"token {jti} was already revoked")
    return 0


# load balancers


def cmd_lb(args: argparse.Namespace) -> int:
    from sentientedge import lb

    config = _config()
    controller = _running_controller(args.address, config)
    if controller is None:
        return 1
    from actors import ray_api

    report = ray_api.call_sync(controller, "cluster_status", timeout=60)
    backends = [
        lb.Backend(f"node-{node_id[:12]}", node["address"], node.get("port") or config.port)
        for node_id, node in sorted(report["nodes"].items())
        if node["alive"] and node["ingresses"] and node["address"]
    ]
    if not backends:
        print("no ingress node serves yet", file=sys.stderr)
        return 1
    if args.kind == "haproxy":
        text = lb.haproxy_config(
            backends, bind=args.bind or "*:80", stats_bind=args.stats, runtime_socket=args.socket
        )
    else:
        text = lb.nginx_config(
            backends,
            listen=args.bind or "443",
            certificate=args.cert,
            certificate_key=args.key,
            prefix=args.prefix,
            pid=args.pid,
        )
    if args.out is None:
        print(text, end="")
    else:
        Path(args.out).write_text(text)
        print(f"{args.kind}: {len(backends)} ingress node(s) -> {args.out}", file=sys.stderr)
    return 0


# secrets


def cmd_secrets(args: argparse.Namespace) -> int:
    if args.secrets_command == "new-key":
        from sentientedge.sealing import generate_key

        print(generate_key())  # for ENCRYPTION_KEY (or a client's fleet_key)
        return 0
    config = _config()
    if args.secrets_command == "rotate":
        written = state.rotate_secrets(config)
        _audit(config, "secrets_rotated", names=written)
        print("new JWT_SECRET and API_KEY_SECRET; the previous ones still verify until retired")
    else:
        gone = state.retire_secrets(config)
        _audit(config, "secrets_retired", names=gone)
        print(
            "previous secrets retired: tokens and keys signed with them no longer work"
            if gone
            else "no previous secrets to retire"
        )
    record = state.load_router(config)
    if record is None and args.address is None:
        print("no router running here: it starts with these secrets")
        return 0
    controller = _running_controller(args.address, config)
    if controller is None:
        return 1
    from actors import ray_api

    reports = ray_api.call_sync(controller, "renew_ingresses", timeout=900)
    for report in reports:
        print(
            f"{report['ingress']} -> {report['replaced_by']}: "
            f"{report['closed']} connections moved (closed with 1012, resumed elsewhere)"
        )
    return 0


# admins


def cmd_admin(args: argparse.Namespace) -> int:
    config = _config()
    store = _admin_store(config)
    if args.admin_command == "list":
        for name in store.admin_names():
            print(name)
        return 0
    if args.admin_command == "remove":
        removed = store.remove_admin(args.name)
        _audit(config, "admin_removed", admin=args.name, newly=removed)
        print(f"removed {args.name}" if removed else f"no admin {args.name}")
        return 0 if removed else 1
    admins.check_name(args.name)
    password = _read_new_password(args.password_stdin)
    enrolment = admins.enrol(args.name, password)
    store.put_admin(args.name, enrolment.record.to_mapping())
    _audit(config, "admin_enrolled", admin=args.name)
    print(f"admin {args.name} enrolled. Add this to an authenticator app (shown once):\n")
    print(admins.qr_text(enrolment.uri))
    print(f"\n{enrolment.uri}\n")
    print(
        'Then POST /auth/token with {"user", "password", "otp"} for an admin token '
        f"({min(config.admin_token_ttl, config.jwt_max_ttl)} s)."
    )
    return 0


def _read_new_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    password = getpass.getpass("password: ")
    if getpass.getpass("again: ") != password:
        raise admins.EnrolmentRefused("the passwords differ")
    return password


# demo


def _when(text: str | None, now_ms: int) -> int | None:
    """A time for --from / --to: ms since the epoch, ISO 8601 (UTC unless it says), or a
    moment relative to now (``-10m``, ``-2h``, ``-1d``, ``-30s``)."""
    if text is None:
        return None
    units = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    if text.startswith("-") and text[-1:] in units and text[1:-1].isdigit():
        return now_ms - int(text[1:-1]) * units[text[-1]]
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"error: {text!r}: expected ms, ISO 8601 or -10m") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp() * 1000)


def _client_tls(config: Config) -> Any:
    """Trust the router's own certificate (a self-signed one, say) besides the system's."""
    import ssl

    return ssl.create_default_context(cafile=config.tls_cert_file)


def cmd_history(args: argparse.Namespace) -> int:
    """Archived messages of a topic or filter, one JSON ``msg`` frame a line, oldest first."""
    from sentientedge.client import fetch_history
    from sentientedge.errors import ConnectRejected

    config = _config()
    assert config.jwt_secret is not None
    url = args.url or f"{config.scheme}://127.0.0.1:{config.port}/ws"
    now_ms = int(time.time() * 1000)
    token = args.token or auth.mint_jwt(
        config.jwt_secret,
        f"history-{getpass.getuser()}",
        auth.Role.OBSERVER,
        300,
        issuer=config.jwt_issuer,
        audience=config.jwt_audience,
    )
    try:
        messages = asyncio.run(
            fetch_history(
                url,
                args.topic,
                since=_when(args.since, now_ms),
                until=_when(args.until, now_ms),
                limit=args.limit,
                token=token,
                ssl=_client_tls(config) if url.startswith("wss:") else None,
            )
        )
    except ConnectRejected as exc:
        body = exc.body or {}
        print(f"error: {exc.status}: {body.get('reason') or body.get('error')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: no router at {url}: {exc}", file=sys.stderr)
        return 1
    for m in messages:
        frame = {"topic": m.topic, "data": m.data, "qos": m.qos, "from": m.sender, "ts": m.ts}
        print(codec.encode_json({"op": "msg", **frame}))
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    """``archive prune``: apply ARCHIVE_RETENTION_DAYS (or --days) now."""
    from sentientedge.database import Database
    from sentientedge.errors import ArchiveUnavailable

    config = _config()
    if config.database_url is None:
        print("error: no archive configured (DATABASE_URL)", file=sys.stderr)
        return 1
    days = config.archive_retention_days if args.days is None else args.days
    database = Database(config.database_url, 1)

    async def prune() -> list[str]:
        try:
            return await database.prune(days)
        finally:
            await database.close()

    try:
        dropped = asyncio.run(prune())
    except ArchiveUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _audit(config, "archive_pruned", days=days, dropped=len(dropped))
    print(f"dropped {len(dropped)} partitions older than {days} days" if days > 0 else "kept all")
    for name in dropped:
        print(f"  {name}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    config = _config()
    url = args.url or f"ws://127.0.0.1:{config.port}/ws"
    return asyncio.run(_demo(config, url, args))


CONSOLE_TOKEN_TTL_S = 12 * 3600


def _print_console_link(config: Config, ws_url: str) -> None:
    """The console's URL with an observer token of its own (``#token=``: it signs in at once).
    Printed for the person at the terminal, never logged; audited like `sentientedge token`."""
    assert config.jwt_secret is not None
    subject = f"console-{getpass.getuser()}"
    ttl = min(CONSOLE_TOKEN_TTL_S, config.jwt_max_ttl)
    token = auth.mint_jwt(
        config.jwt_secret,
        subject,
        auth.Role.OBSERVER,
        ttl,
        issuer=config.jwt_issuer,
        audience=config.jwt_audience,
    )
    jti = auth.token_claims_unverified(token)["jti"]
    _audit(config, "token_minted", sub=subject, role=auth.Role.OBSERVER.value, jti=jti, ttl_s=ttl)
    # In the fragment: a browser never sends it, so no server or proxy log can hold it.
    from sentientedge.client import http_url

    link = f"{http_url(ws_url, '/console')}#{urllib.parse.urlencode({'token': token})}"
    print(f"console:   {link}  (an observer for {ttl / 3600:g} h)")


async def _demo(config: Config, url: str, args: argparse.Namespace) -> int:
    from sentientedge.client import Client
    from sentientedge.fleet import fly

    assert config.api_key_secret is not None and config.jwt_secret is not None
    token = auth.mint_jwt(
        config.jwt_secret,
        "demo-station",
        auth.Role.OBSERVER,
        min(24 * 3600, config.jwt_max_ttl),
        issuer=config.jwt_issuer,
        audience=config.jwt_audience,
    )
    station = await Client.connect(url, token=token)
    await station.subscribe("drone/+/telemetry")
    drones = [
        await Client.connect(
            url, api_key=auth.issue_api_key(config.api_key_secret, f"demo-{i}").key
        )
        for i in range(args.drones)
    ]
    duration = args.duration or None
    _print_console_link(config, url)
    print(
        f"demo: {args.drones} drones at {args.rate} Hz -> {url}; "
        "ground station on drone/+/telemetry"
    )
    print("      Ctrl-C to stop" if duration is None else f"      for {duration:.0f} s")
    flights = [
        asyncio.create_task(fly(d, f"demo-{i}", args.rate, duration)) for i, d in enumerate(drones)
    ]
    received = 0
    latencies: list[float] = []
    last_report = time.monotonic()
    try:
        while not all(f.done() for f in flights) or station.recv_nowait() is not None:
            try:
                message = await station.recv(timeout=1.0)
            except asyncio.TimeoutError:
                message = None
            if message is not None and not message.retained:  # retained: where drones were
                received += 1
                if isinstance(message.data, dict) and "sent" in message.data:
                    latencies.append(message.received_at - message.data["sent"])
            if time.monotonic() - last_report >= 1.0 or message is None:
                latencies.sort()
                p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0.0
                print(f"  {received:>8} received   p99 {p99:6.1f} ms", flush=True)
                latencies.clear()
                last_report = time.monotonic()
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        for flight in flights:
            flight.cancel()
        for client in (*drones, station):
            await client.close()
    print(f"demo done: {received} messages received")
    return 0


def cmd_mavlink(args: argparse.Namespace) -> int:
    """Bridge a MAVLink vehicle: in this process, or (``--on-node``) as a Ray actor on the node
    its link reaches; ``--stop`` ends such an actor."""
    from sentientedge import mavlink_bridge

    if not (args.on_node or args.stop):
        return mavlink_bridge.run(args)
    from actors import ray_api
    from actors.mavlink_bridge import MavlinkBridge

    config = Config.from_env()
    name = ray_api.mavlink_bridge_name(args.drone)
    settings = None
    if not args.stop:
        try:
            settings = mavlink_bridge.settings_from_args(args)
        except BridgeFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    _connect(args.address, config)
    running = ray_api.find_actor(name, config.ray_namespace)
    if running is not None:  # one bridge a drone: a new one replaces it
        ray_api.kill(running)
    if settings is None:
        print(f"mavlink bridge {name} " + ("stopped" if running else "was not running"))
        return 0
    node = ray_api.alive_node(args.on_node)
    if node is None:
        print(f"error: no alive Ray node {args.on_node!r} (a node id or address)", file=sys.stderr)
        return 1
    actor = ray_api.create_mavlink_bridge(MavlinkBridge, settings, config.ray_namespace, node[0])
    ray_api.call_sync(actor, "stats", timeout=60)  # constructed: bridging from now on
    print(
        f"mavlink bridge {name} runs on node {node[1]} ({node[0][:12]}): {settings.connect} -> "
        f"{settings.url}; `sentientedge mavlink --stop --drone {args.drone}` ends it"
    )
    return 0


def _mavlink_arguments(parser: argparse.ArgumentParser) -> None:
    """``sentientedge mavlink``'s options (here, not in mavlink_bridge: pymavlink takes half a
    second to import, and every command builds this parser)."""
    parser.add_argument(
        "--connect",
        help="the autopilot's link, any pymavlink connection string: udpin:0.0.0.0:14550, "
        "udpout:HOST:PORT, tcp:HOST:5760, /dev/ttyACM0",
    )
    parser.add_argument("--drone", required=True, help="the drone id its API key was issued for")
    parser.add_argument(
        "--key", help="the drone's API key (default $SENTIENTEDGE_API_KEY: not seen in ps)"
    )
    parser.add_argument("--url", help="the router (default ws://127.0.0.1:$PORT/ws)")
    parser.add_argument(
        "--max-rate",
        type=float,
        help="telemetry messages a second at most (default: the vehicle's position rate, "
        "within half the router's drone rate limit)",
    )
    parser.add_argument("--baud", type=int, default=57600, help="serial links: bits a second")
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=None,
        help="seconds without the vehicle's heartbeat before the drone is reported offline "
        "(default 3)",
    )
    parser.add_argument(
        "--command-max-age",
        type=float,
        default=60.0,
        help="commands older than this many seconds are refused, not flown (0: no limit)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sentientedge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start (or join) a Ray cluster and start the router")
    up.add_argument("--address", help="Ray cluster to join (auto, host:port); default: local")
    default_size = default_actor_count()
    up.add_argument(
        "--ingress",
        type=int,
        default=default_size,
        help=f"ingress actors (default: half the CPUs here, {default_size})",
    )
    up.add_argument(
        "--shards",
        type=int,
        default=default_size,
        help=f"topic-shard actors (default: half the CPUs here, {default_size})",
    )
    up.add_argument("--num-cpus", type=int, help="CPUs for a local Ray head started here")
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="what runs where")
    status.add_argument("--address")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    down = sub.add_parser("down", help="stop the router and what `up` started")
    down.add_argument("--address")
    down.set_defaults(func=cmd_down)

    drain = sub.add_parser(
        "drain", help="stop an ingress taking connections, close its own with 1012 (resume)"
    )
    drain.add_argument("ingress", help="e.g. ingress-0 (see `status`)")
    drain.add_argument("--restart", action="store_true", help="then replace its process")
    drain.add_argument("--address")
    drain.set_defaults(func=cmd_drain)

    restart = sub.add_parser("restart", help="rolling restart: drain and replace each ingress")
    restart.add_argument("--address")
    restart.set_defaults(func=cmd_drain)

    scale = sub.add_parser(
        "scale", help="add or remove instances (an ingress and a shard each), resharding live"
    )
    scale.add_argument("direction", choices=("up", "down"))
    scale.add_argument("instances", nargs="?", type=int, default=1)
    scale.add_argument("--address", help="Ray cluster address (default: the one `up` started)")
    scale.add_argument("--no-wait", action="store_true", help="return once the step is accepted")
    scale.set_defaults(func=cmd_scale)

    keys = sub.add_parser("keys", help="drone API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    issue = keys_sub.add_parser("issue", help="issue a key for a drone id; prints it")
    issue.add_argument("drone_id")
    issue.add_argument("--ttl", type=parse_duration, help="the key expires after this (e.g. 90d)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key (the key itself or its id)")
    revoke.add_argument("key")
    keys_sub.add_parser("list", help="issued keys and whether they are revoked")
    keys.set_defaults(func=cmd_keys)

    token = sub.add_parser("token", help="mint a JWT (or: token revoke TOKEN_OR_JTI)")
    token.add_argument("--role", choices=[r.value for r in auth.Role])
    token.add_argument("--sub", help="subject: a person's or program's name")
    token.add_argument("--ttl", type=parse_duration, default=parse_duration("15m"))
    token.add_argument("--acl-pub", nargs="*", help="narrow publish rights to these filters")
    token.add_argument("--acl-sub", nargs="*", help="narrow subscribe rights to these filters")
    token_sub = token.add_subparsers(dest="token_command")
    token_revoke = token_sub.add_parser(
        "revoke", help="revoke a token (the token itself or its jti): its connections close"
    )
    token_revoke.add_argument("token")
    token.set_defaults(func=cmd_token)

    balancer = sub.add_parser(
        "lb", help="print (or --out) a HAProxy or NGINX configuration for the live ingress nodes"
    )
    balancer.add_argument("kind", choices=["haproxy", "nginx"])
    balancer.add_argument("--out", help="write it to this file instead of standard output")
    balancer.add_argument("--address", help="Ray cluster address (default: the one `up` started)")
    balancer.add_argument("--bind", help="where it listens (haproxy: *:80, nginx: 443)")
    balancer.add_argument("--stats", default="127.0.0.1:8404", help="haproxy's stats page")
    balancer.add_argument(
        "--socket", default="/run/haproxy/sentientedge.sock", help="haproxy's runtime API"
    )
    balancer.add_argument("--cert", default="/etc/sentientedge/tls/cert.pem", help="nginx: TLS")
    balancer.add_argument("--key", default="/etc/sentientedge/tls/key.pem", help="nginx: TLS")
    balancer.add_argument("--prefix", default="/var/lib/nginx", help="nginx: its work files")
    balancer.add_argument("--pid", default="/run/nginx-sentientedge.pid", help="nginx: pid file")
    balancer.set_defaults(func=cmd_lb)

    secrets_parser = sub.add_parser("secrets", help="rotate the router's secrets; make keys")
    secrets_sub = secrets_parser.add_subparsers(dest="secrets_command", required=True)
    rotate = secrets_sub.add_parser(
        "rotate", help="new JWT and API key secrets, the old ones still accepted; no downtime"
    )
    retire = secrets_sub.add_parser(
        "retire", help="stop accepting the secrets before the last rotate"
    )
    for command in (rotate, retire):
        command.add_argument(
            "--address", help="Ray cluster address (default: the one `up` started)"
        )
    new_key = secrets_sub.add_parser(
        "new-key", help="print a new ENCRYPTION_KEY (32 random bytes, base64)"
    )
    new_key.set_defaults(address=None)
    secrets_parser.set_defaults(func=cmd_secrets)

    admin = sub.add_parser("admin", help="admins: password and one-time code (TOTP)")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    add = admin_sub.add_parser("add", help="enrol an admin (or reset one); shows a QR code")
    add.add_argument("name")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    remove = admin_sub.add_parser("remove", help="remove an admin")
    remove.add_argument("name")
    admin_sub.add_parser("list", help="enrolled admins")
    admin.set_defaults(func=cmd_admin)

    history = sub.add_parser(
        "history", help="archived messages of a topic or filter (needs DATABASE_URL)"
    )
    history.add_argument("topic", help="a topic or filter: drone/d1/telemetry, drone/+/event")
    history.add_argument("--from", dest="since", help="ms, ISO 8601 or -10m (default: -1h)")
    history.add_argument("--to", dest="until", help="ms, ISO 8601 or -10m (default: now)")
    history.add_argument("--limit", type=int, help="at most this many (default 1000, max 10000)")
    history.add_argument("--url", help="default ws://127.0.0.1:$PORT/ws")
    history.add_argument("--token", help="read as this token's holder (default: an observer)")
    history.set_defaults(func=cmd_history)

    archive_parser = sub.add_parser("archive", help="the flight history's upkeep")
    archive_sub = archive_parser.add_subparsers(dest="archive_command", required=True)
    prune = archive_sub.add_parser("prune", help="drop partitions past the retention now")
    prune.add_argument("--days", type=int, help="default ARCHIVE_RETENTION_DAYS")
    prune.set_defaults(func=cmd_archive)

    mavlink = sub.add_parser(
        "mavlink", help="bridge a MAVLink autopilot (PX4, ArduPilot) to the router as its drone"
    )
    _mavlink_arguments(mavlink)
    mavlink.add_argument(
        "--on-node",
        metavar="NODE",
        help="run as a Ray actor on this node (id or address) of the router's cluster",
    )
    mavlink.add_argument("--stop", action="store_true", help="end the drone's bridge actor")
    mavlink.add_argument("--address", help="Ray cluster address (default: the one `up` started)")
    mavlink.set_defaults(func=cmd_mavlink)

    demo = sub.add_parser("demo", help="fly simulated drones against a running router")
    demo.add_argument("--url", help="default ws://127.0.0.1:$PORT/ws")
    demo.add_argument("--drones", type=int, default=10)
    demo.add_argument("--rate", type=float, default=10.0, help="telemetry Hz per drone")
    demo.add_argument("--duration", type=float, default=0, help="seconds; 0 = until Ctrl-C")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except (SentientEdgeError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
