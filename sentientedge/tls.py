"""TLS on the router's port (``USE_HTTPS``): the server's context, and its certificate renewed
without a restart.

Rules for this module:
- TLS 1.3 at least; ``TLS_MIN_VERSION=1.2`` lets TLS 1.2 clients in, explicitly (RFC 8446 for
  1.3; 1.2 keeps the secure cipher list of ``ssl.create_default_context``).
- One context for the life of a server. A renewed certificate is loaded into that same context:
  handshakes from then on present it, connections already open keep the session they have.
- A pair that does not load (unreadable, half written, certificate and key not matching) changes
  nothing: it is tried in a scratch context first, the current one stays and a warning says why.
  Messages name files and OpenSSL's reason, never key material.
- A reload follows a change to either file (polled: inode, size, times) or a SIGHUP, where the
  event loop can take signals (the main thread only; a Ray actor's loop often runs elsewhere).
- OpenSSL keeps one certificate per key type: renewing an EC certificate with an RSA one (or the
  reverse) leaves both in the context, and clients may still get the old one. Change the key
  type with a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import ssl
from pathlib import Path

from sentientedge.config import Config
from sentientedge.errors import ConfigError

log = logging.getLogger(__name__)

POLL_S = 2.0

# The loaded files as last seen: per file (device, inode, size, mtime, ctime), None if missing.
_Stat = tuple[int, int, int, int, int]
_Signature = tuple[_Stat | None, ...]

# Exceptions a certificate or key that does not load raises.
_LOAD_ERRORS = (OSError, ssl.SSLError, ValueError)


def minimum_version(config: Config) -> ssl.TLSVersion:
    if config.tls_min_version == "1.2":
        return ssl.TLSVersion.TLSv1_2
    if not ssl.HAS_TLSv1_3:
        raise ConfigError(
            "TLS_MIN_VERSION", config.tls_min_version, "this OpenSSL has no TLS 1.3; set 1.2"
        )
    return ssl.TLSVersion.TLSv1_3


def server_context(config: Config) -> ssl.SSLContext:
    """The context of the server's listening socket, with the certificate and key loaded."""
    cert_file, key_file = config.tls_cert_file, config.tls_key_file
    for name, value in (("TLS_CERT_FILE", cert_file), ("TLS_KEY_FILE", key_file)):
        if not value:
            raise ConfigError(name, value, "must be set when USE_HTTPS is true")
    assert cert_file is not None and key_file is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = minimum_version(config)
    context.options |= ssl.OP_NO_RENEGOTIATION  # TLS 1.2: no client-initiated renegotiation
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except _LOAD_ERRORS as exc:
        raise ConfigError(
            "TLS_CERT_FILE", cert_file, f"does not load with TLS_KEY_FILE: {exc}"
        ) from None
    return context


def plain_text_warning(config: Config) -> str | None:
    """One line to print when the router would serve plain ws:// beyond this machine."""
    if config.use_https or is_loopback(config.host):
        return None
    return (
        f"warning: USE_HTTPS is off and HOST={config.host} is not loopback: tokens, API keys "
        "and telemetry cross the network in plain text; set USE_HTTPS=true with TLS_CERT_FILE "
        "and TLS_KEY_FILE, or HOST=127.0.0.1 behind a TLS proxy"
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name, as HOST holds it) binds to loopback only;
    ``0.0.0.0``, ``::`` and the empty host bind to every interface."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761, section 6.3
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False  # another name: it may resolve to anything
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class CertificateReloader:
    """Loads ``cert_file`` and ``key_file`` into ``context`` again when they change.

    ``start()`` (on a running loop) polls the files every ``poll_s`` seconds and listens for
    SIGHUP where the loop allows it; ``stop()`` ends both. ``check()`` and ``reload()`` do one
    step, for callers and tests that drive it themselves.
    """

    def __init__(
        self, context: ssl.SSLContext, cert_file: str, key_file: str, poll_s: float = POLL_S
    ) -> None:
        self.context = context
        self.cert_file = cert_file
        self.key_file = key_file
        self.poll_s = poll_s
        self.reloads = 0  # certificates loaded since start
        self.hangup = False  # whether SIGHUP reloads in this process
        self._seen: _Signature | None = _signature((cert_file, key_file))
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def for_config(cls, context: ssl.SSLContext, config: Config) -> CertificateReloader:
        assert config.tls_cert_file is not None and config.tls_key_file is not None
        return cls(context, config.tls_cert_file, config.tls_key_file)

    def start(self) -> None:
        if self._task is not None:
            return
        loop = self._loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._poll())
        self.hangup = _listen_for_hangup(loop, self)

    async def stop(self) -> None:
        if self._task is None:
            return
        if self.hangup and self._loop is not None:
            _stop_listening_for_hangup(self._loop, self)
            self.hangup = False
        task, self._task = self._task, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def check(self) -> bool:
        """Reload if either file changed since it was last loaded or tried; True if loaded."""
        if _signature((self.cert_file, self.key_file)) == self._seen:
            return False
        return self.reload()

    def reload(self) -> bool:
        """Load the files into the context if they hold a matching pair; True if loaded."""
        # Seen before reading: a write after this point is a change for the next check.
        self._seen = _signature((self.cert_file, self.key_file))
        try:
            scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            scratch.load_cert_chain(self.cert_file, self.key_file, password=_no_password)
        except _LOAD_ERRORS as exc:
            log.warning("TLS certificate not reloaded, the current one stays: %s", exc)
            return False
        try:
            self.context.load_cert_chain(self.cert_file, self.key_file, password=_no_password)
        except _LOAD_ERRORS as exc:
            # Rewritten between the two loads: the context may hold half of the new pair.
            # Try again at the next check, whatever the files look like then.
            self._seen = None
            log.error("TLS certificate changed while loading, loading again soon: %s", exc)
            return False
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cert_file)
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                self.check()
            except Exception:  # the poll must outlive any one failure
                log.exception("TLS certificate check failed")

    def _on_hangup(self) -> None:
        log.info("SIGHUP: reloading the TLS certificate")
        try:
            self.reload()
        except Exception:
            log.exception("TLS certificate reload failed")


def _signature(paths: tuple[str, ...]) -> _Signature:
    out: list[_Stat | None] = []
    for path in paths:
        try:
            st = os.stat(path)  # through symbolic links: renewals often swap a link's target
        except OSError:
            out.append(None)
        else:
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def _no_password() -> bytes:
    # Without a callback OpenSSL would ask for a passphrase on the terminal, and wait.
    raise ValueError("the private key is encrypted; TLS_KEY_FILE must hold it unencrypted")


# SIGHUP reloads every reloader started on the loop that took the signal (one per process, in
# practice); add_signal_handler keeps one handler per signal, so they share it.
_hangup_listeners: dict[asyncio.AbstractEventLoop, list[CertificateReloader]] = {}


def _listen_for_hangup(loop: asyncio.AbstractEventLoop, reloader: CertificateReloader) -> bool:
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is None:
        return False
    listeners = _hangup_listeners.get(loop)
    if listeners is None:
        try:
            loop.add_signal_handler(hangup, _on_hangup, loop)
        except (NotImplementedError, RuntimeError, ValueError) as exc:
            # Not the main thread (Ray may run an actor's loop on another), or no signals.
            log.info("SIGHUP does not reload the TLS certificate here (%s); file changes do", exc)
            return False
        listeners = _hangup_listeners[loop] = []
    listeners.append(reloader)
    return True


def _stop_listening_for_hangup(
    loop: asyncio.AbstractEventLoop, reloader: CertificateReloader
) -> None:
    listeners = _hangup_listeners.get(loop, [])
    if reloader in listeners:
        listeners.remove(reloader)
    if not listeners and _hangup_listeners.pop(loop, None) is not None and not loop.is_closed():
        loop.remove_signal_handler(signal.SIGHUP)


def _on_hangup(loop: asyncio.AbstractEventLoop) -> None:
    for reloader in list(_hangup_listeners.get(loop, [])):
        reloader._on_hangup()


def self_signed(directory: Path, common_name: str = "127.0.0.1") -> tuple[Path, Path, bytes]:
    """A self-signed EC certificate for 127.0.0.1 and its key, written to ``directory``
    (``cert.pem``, ``key.pem``); and the certificate's DER, to tell certificates apart.
    For trying TLS on one machine: the tests, the benchmarks through NGINX."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
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
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, cert.public_bytes(serialization.Encoding.DER)
