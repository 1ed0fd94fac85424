"""TLS settings (sentientedge/tls.py): the minimum version, the plain-text warning, and the
certificate reloader. Handshakes run in memory (``ssl.MemoryBIO``): no sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sentientedge.config import Config
from sentientedge.errors import ConfigError
from sentientedge.tls import CertificateReloader, plain_text_warning, server_context
from tests.helpers import eventually, self_signed


def https(cert: Path, key: Path, host: str = "0.0.0.0") -> Config:
    return Config(host=host, use_https=True, tls_cert_file=str(cert), tls_key_file=str(key))


def client_context(maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client that takes any certificate: the tests compare what they get."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        context.maximum_version = maximum
    return context


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """One handshake in memory; the client's end of it (raises ``ssl.SSLError`` on refusal)."""
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server_end = server.wrap_bio(server_in, server_out, server_side=True)
    client_end = client.wrap_bio(client_in, client_out, server_hostname="127.0.0.1")
    for _ in range(10):
        done = True
        for end in (client_end, server_end):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                done = False
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if done:
            return client_end
    raise AssertionError("handshake did not finish")


def served(context: ssl.SSLContext) -> bytes | None:
    return handshake(context, client_context()).getpeercert(binary_form=True)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, bytes]:
    return self_signed(tmp_path / "live", "first")


# Minimum version


def test_tls_1_3_is_the_minimum_by_default(pair):
    cert, key, _ = pair
    context = server_context(https(cert, key))
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert handshake(context, client_context()).version() == "TLSv1.3"
    with pytest.raises(ssl.SSLError):
        handshake(context, client_context(maximum=ssl.TLSVersion.TLSv1_2))


def test_tls_min_version_1_2_lets_tls_1_2_clients_in(pair):
    cert, key, _ = pair
    env = {"USE_HTTPS": "true", "TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)}
    config = Config.from_env({**env, "TLS_MIN_VERSION": "1.2"})
    context = server_context(config)
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert handshake(context, client_context(ssl.TLSVersion.TLSv1_2)).version() == "TLSv1.2"
    assert handshake(context, client_context()).version() == "TLSv1.3"  # still preferred


def test_a_pair_that_does_not_load_names_the_variable(tmp_path, pair):
    cert, _, _ = pair
    _, other_key, _ = self_signed(tmp_path / "other", "other")
    with pytest.raises(ConfigError, match="TLS_CERT_FILE"):
        server_context(https(cert, other_key))
    with pytest.raises(ConfigError, match="TLS_KEY_FILE"):
        server_context(Config(tls_cert_file=str(cert)))


def test_an_encrypted_key_is_refused_not_prompted_for(tmp_path, pair):
    cert, key, _ = pair
    loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match="encrypted"):
        server_context(https(cert, encrypted))


# Plain text beyond loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.20", "10.0.0.1", "router.lan"])
def test_plain_text_on_a_reachable_address_is_warned_about(host):
    warning = plain_text_warning(Config(host=host))
    assert warning is not None and "\n" not in warning
    assert f"HOST={host} " in warning and "USE_HTTPS" in warning


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost", "LOCALHOST.", "::ffff:127.0.0.1"],
)
def test_plain_text_on_loopback_is_not_warned_about(host):
    assert plain_text_warning(Config(host=host)) is None


def test_https_is_not_warned_about(pair):
    cert, key, _ = pair
    assert plain_text_warning(https(cert, key, host="0.0.0.0")) is None


# Reloading the certificate


def replace_pair(live: Path, new: Path) -> None:
    """Install a new pair over the live one the way renewal tools do: rename over it."""
    os.replace(new / "cert.pem", live / "cert.pem")
    os.replace(new / "key.pem", live / "key.pem")


def test_a_new_pair_is_served_by_the_same_context(tmp_path, pair):
    cert, key, first = pair
    context = server_context(https(cert, key))
    reloader = CertificateReloader(context, str(cert), str(key))
    opened = handshake(context, client_context())  # open before the renewal
    assert not reloader.check()  # nothing changed
    _, _, second = self_signed(tmp_path / "new", "second")
    replace_pair(cert.parent, tmp_path / "new")
    assert reloader.check()
    assert served(context) == second != first
    assert opened.getpeercert(binary_form=True) == first  # it keeps what it negotiated
    assert reloader.reloads == 1
    assert not reloader.check()  # loaded once per change


def test_a_bad_pair_keeps_the_current_certificate(tmp_path, pair, caplog):
    cert, key, first = pair
    context = server_context(https(cert, key))
    reloader = CertificateReloader(context, str(cert), str(key))
    self_signed(tmp_path / "new", "second")
    secret = (tmp_path / "new" / "key.pem").read_text()
    os.replace(tmp_path / "new" / "key.pem", key)  # the key of a certificate not installed
    with caplog.at_level(logging.WARNING, logger="sentientedge.tls"):
        assert not reloader.check()
    assert served(context) == first
    assert "the current one stays" in caplog.text
    body = "".join(secret.splitlines()[1:-1])
    assert "PRIVATE KEY" not in caplog.text and body[:16] not in caplog.text
    assert not reloader.check()  # warned once, not at every poll

    cert.write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")
    assert not reloader.check()
    key.unlink()
    assert not reloader.check()
    assert served(context) == first


async def test_the_poll_picks_up_a_renewal(tmp_path, pair):
    cert, key, _ = pair
    context = server_context(https(cert, key))
    reloader = CertificateReloader(context, str(cert), str(key), poll_s=0.05)
    reloader.start()
    try:
        _, _, second = self_signed(tmp_path / "new", "second")
        replace_pair(cert.parent, tmp_path / "new")
        await eventually(lambda: served(context) == second, 5, "the renewed certificate")
    finally:
        await reloader.stop()


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here")
async def test_sighup_reloads_on_the_main_thread(tmp_path, pair):
    cert, key, _ = pair
    context = server_context(https(cert, key))
    reloader = CertificateReloader(context, str(cert), str(key), poll_s=3600)
    reloader.start()
    try:
        assert threading.current_thread() is threading.main_thread()
        assert reloader.hangup  # or the signal below would end the test process
        _, _, second = self_signed(tmp_path / "new", "second")
        # The poll would take an hour: only the signal reloads.
        replace_pair(cert.parent, tmp_path / "new")
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: reloader.reloads == 1, 5, "the reload on SIGHUP")
        assert served(context) == second
    finally:
        await reloader.stop()
    assert signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, None)  # handler removed


def loop_factories() -> list[Callable[[], asyncio.AbstractEventLoop]]:
    factories: list[Callable[[], asyncio.AbstractEventLoop]] = [asyncio.new_event_loop]
    with contextlib.suppress(ImportError):
        import uvloop  # what Ray runs async actors on when it is installed

        factories.append(uvloop.new_event_loop)
    return factories


@pytest.mark.parametrize("new_loop", loop_factories(), ids=lambda f: f.__module__.split(".")[0])
def test_off_the_main_thread_the_poll_still_reloads(tmp_path, pair, new_loop):
    # As in a Ray actor, whose event loop runs on a thread of its own ("AsyncIO Thread").
    cert, key, _ = pair
    context = server_context(https(cert, key))
    _, _, second = self_signed(tmp_path / "new", "second")
    outcome: dict[str, object] = {}

    async def run() -> None:
        reloader = CertificateReloader(context, str(cert), str(key), poll_s=0.05)
        reloader.start()  # add_signal_handler fails here: no SIGHUP, polling only
        outcome["hangup"] = reloader.hangup
        replace_pair(cert.parent, tmp_path / "new")
        await eventually(lambda: reloader.reloads == 1, 5, "the poll's reload")
        outcome["reloads"] = reloader.reloads
        await reloader.stop()

    def in_thread() -> None:
        loop = new_loop()
        try:
            loop.run_until_complete(run())
        finally:
            loop.close()

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(10)
    assert outcome == {"hangup": False, "reloads": 1}
    assert served(context) == second
