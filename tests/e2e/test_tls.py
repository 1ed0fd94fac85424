"""USE_HTTPS: the same endpoint as wss:// and https://, with the router's own certificate."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sentientedge.client import Client
from sentientedge.config import Config
from sentientedge.errors import ConfigError
from tests.e2e.support import RedisServer, Router, embedded_router, next_on
from tests.helpers import eventually, self_signed


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))[:2]


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


@pytest.fixture(scope="module")
def tls12_router(
    ray_cluster: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Router, Path]]:
    """A router that lets TLS 1.2 clients in (TLS_MIN_VERSION=1.2), and its certificate."""
    cert, key, _ = self_signed(tmp_path_factory.mktemp("tls12"))
    with embedded_router(
        ray_cluster,
        redis_server,
        tmp_path_factory.mktemp("tls12-state"),
        USE_HTTPS="true",
        TLS_CERT_FILE=str(cert),
        TLS_KEY_FILE=str(key),
        TLS_MIN_VERSION="1.2",
    ) as started:
        yield started, cert


def trusting(cert: Path, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client context that trusts ``cert`` as it is on disk now."""
    context = ssl.create_default_context()
    context.load_verify_locations(cert)
    if maximum is not None:
        context.maximum_version = maximum
    return context


async def handshake(port: int, context: ssl.SSLContext) -> tuple[str, bytes]:
    """A bare TLS handshake with the router: the version agreed and the certificate served."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"), 10
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        return ssl_object.version(), ssl_object.getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def der(cert: Path) -> bytes:
    return x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


def served_certificate(client: Client) -> bytes:
    """The certificate an open connection was set up with."""
    return client.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)


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


async def test_tls_1_3_is_agreed_and_tls_1_2_clients_are_refused(tls_router: Router, tls):
    cert, _ = tls
    version, _ = await handshake(tls_router.port, trusting(cert))
    assert version == "TLSv1.3"
    # The server refuses the ClientHello: an alert, or the connection reset right away.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(tls_router.port, trusting(cert, maximum=ssl.TLSVersion.TLSv1_2))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await Client.connect(
            f"wss://127.0.0.1:{tls_router.port}/ws",
            token=tls_router.token("observer", "tls12"),
            ssl=trusting(cert, maximum=ssl.TLSVersion.TLSv1_2),
        )


async def test_tls_min_version_1_2_lets_tls_1_2_clients_in(tls12_router):
    router, cert = tls12_router
    old_client = trusting(cert, maximum=ssl.TLSVersion.TLSv1_2)
    version, _ = await handshake(router.port, old_client)
    assert version == "TLSv1.2"
    assert (await handshake(router.port, trusting(cert)))[0] == "TLSv1.3"  # still preferred
    url = f"wss://127.0.0.1:{router.port}/ws"
    station = await Client.connect(url, token=router.token("observer", "tls12"), ssl=old_client)
    await station.subscribe("drone/tls12-1/telemetry")
    drone = await Client.connect(url, api_key=router.api_key("tls12-1"), ssl=old_client)
    await drone.publish("drone/tls12-1/telemetry", {"tls": "1.2"})
    assert (await next_on(station, "drone/tls12-1/telemetry")).data == {"tls": "1.2"}
    for client in (drone, station):
        await client.close()


async def test_a_renewed_certificate_is_served_without_a_restart(
    tls_router: Router, tls, tmp_path: Path
):
    cert, key = tls
    url = f"wss://127.0.0.1:{tls_router.port}/ws"
    old_trust = trusting(cert)
    old = der(cert)
    station = await Client.connect(url, token=tls_router.token("observer", "renew"), ssl=old_trust)
    await station.subscribe("drone/renew-1/telemetry")
    drone = await Client.connect(url, api_key=tls_router.api_key("renew-1"), ssl=old_trust)
    assert served_certificate(station) == old

    # Renewal as certificate tools do it: a new pair (new key, serial and name) renamed over
    # the old files, certificate first.
    new_cert, new_key, _ = self_signed(tmp_path, common_name="renewed.127.0.0.1")
    new = der(new_cert)
    assert new != old
    os.replace(new_cert, cert)
    os.replace(new_key, key)
    new_trust = trusting(cert)

    async def serves_the_new_one() -> bool:
        # The ingress polls the files every 2 s; until then the old certificate fails new_trust.
        try:
            return (await handshake(tls_router.port, new_trust))[1] == new
        except ssl.SSLCertVerificationError:
            return False

    await eventually(serves_the_new_one, 15, "new connections to get the renewed certificate", 0.2)
    renewed = await Client.connect(
        url, token=tls_router.token("observer", "renewed"), ssl=new_trust
    )
    assert served_certificate(renewed) == new
    assert (await handshake(tls_router.port, new_trust))[0] == "TLSv1.3"
    with pytest.raises((ssl.SSLError, ConnectionError)):  # the minimum version is kept
        await handshake(tls_router.port, trusting(cert, maximum=ssl.TLSVersion.TLSv1_2))

    # The connections opened before the renewal are still open, on the old certificate.
    assert not station.closed and not drone.closed
    assert served_certificate(station) == old
    await drone.publish("drone/renew-1/telemetry", {"after": "renewal"})
    assert (await next_on(station, "drone/renew-1/telemetry")).data == {"after": "renewal"}
    assert (station.reconnects, drone.reconnects) == (0, 0)
    for client in (renewed, drone, station):
        await client.close()


def test_use_https_needs_a_certificate_and_a_key():
    with pytest.raises(ConfigError, match="TLS_CERT_FILE"):
        Config.from_env({"USE_HTTPS": "true"})
    with pytest.raises(ConfigError, match="TLS_KEY_FILE"):
        Config.from_env({"USE_HTTPS": "yes", "TLS_CERT_FILE": __file__, "TLS_KEY_FILE": "/nope"})
    with pytest.raises(ConfigError, match="USE_HTTPS"):
        Config.from_env({"USE_HTTPS": "maybe"})
