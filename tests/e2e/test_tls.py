"""USE_HTTPS: the same endpoint as wss:// and https://, with the router's own certificate."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sentientedge.client import Client
from sentientedge.config import Config
from sentientedge.errors import ConfigError
from tests.e2e.support import RedisServer, Router, embedded_router, next_on


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_router(
    ray_cluster: str,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
    tls: tuple[Path, Path],
) -> Iterator[Router]:
    cert, key = tls
    with embedded_router(
        ray_cluster,
        redis_server,
        tmp_path_factory.mktemp("tls-state"),
        USE_HTTPS="true",
        TLS_CERT_FILE=str(cert),
        TLS_KEY_FILE=str(key),
    ) as started:
        yield started


def trusting(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.load_verify_locations(cert)
    return context


async def test_wss_carries_messages_and_https_answers_health(tls_router: Router, tls):
    cert, _ = tls
    url = f"wss://127.0.0.1:{tls_router.port}/ws"
    context = trusting(cert)
    station = await Client.connect(url, token=tls_router.token("observer", "tls"), ssl=context)
    await station.subscribe("drone/tls-1/telemetry")
    drone = await Client.connect(url, api_key=tls_router.api_key("tls-1"), ssl=context)
    await drone.publish("drone/tls-1/telemetry", {"secure": True})
    assert (await next_on(station, "drone/tls-1/telemetry")).data == {"secure": True}

    def health() -> dict:
        with urllib.request.urlopen(
            f"https://127.0.0.1:{tls_router.port}/health", context=context, timeout=10
        ) as response:
            return json.loads(response.read())

    assert (await asyncio.to_thread(health))["server"] == "ingress-0"
    for client in (drone, station):
        await client.close()


async def test_plain_ws_is_not_served_when_https_is_on(tls_router: Router):
    with pytest.raises(Exception):  # noqa: B017 - the TLS server cannot speak plain HTTP
        await Client.connect(
            f"ws://127.0.0.1:{tls_router.port}/ws", token=tls_router.token("observer", "x")
        )


def test_use_https_needs_a_certificate_and_a_key():
    with pytest.raises(ConfigError, match="TLS_CERT_FILE"):
        Config.from_env({"USE_HTTPS": "true"})
    with pytest.raises(ConfigError, match="TLS_KEY_FILE"):
        Config.from_env({"USE_HTTPS": "yes", "TLS_CERT_FILE": __file__, "TLS_KEY_FILE": "/nope"})
    with pytest.raises(ConfigError, match="USE_HTTPS"):
        Config.from_env({"USE_HTTPS": "maybe"})
