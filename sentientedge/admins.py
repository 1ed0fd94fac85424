"""Admins who log in with a password and a TOTP code (PROTOCOL.md, ``POST /auth/token``).

Rules for this module:
- Pure: no Redis, no sockets, no Ray. Records go in and out as :class:`AdminRecord`; the
  caller stores :meth:`AdminRecord.to_mapping` (a str->str Redis hash) and hands back what it
  read. Time is always passed in: ``now`` is Unix seconds for TOTP (wall clock) and any
  monotonic seconds for :class:`LoginThrottle`.
- Passwords are hashed with argon2id (argon2-cffi) after NFKC normalisation (NIST SP 800-63B
  5.1.1.2); they are never stored, logged or put in an exception.
- TOTP is RFC 6238 with the parameters every authenticator app supports: HMAC-SHA1,
  6 digits, 30 s steps. A code is accepted for the current step and one step either side
  (RFC 6238 section 5.2, clock drift), and only for a step later than the last one used
  (section 5.2: "MUST NOT accept the second attempt of the same OTP").
- A refused login says "bad credentials" and nothing else; which factor failed is in
  :attr:`LoginRefused.detail`, for the audit log only.
- ``repr`` of a record or an enrolment never shows the hash, the secret or the URI.

The exceptions raised here (all under ``sentientedge.errors.SentientEdgeError``):

- EnrolmentRefused       a bad admin name, a too short or too long password, a bad issuer
- AdminRecordError       a stored record that cannot be read back (missing or bad field)
- LoginRefused           (an ``AuthError``) password, code or admin wrong: "bad credentials"
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import ipaddress
import math
import re
import secrets
import time
import unicodedata
from collections import OrderedDict, deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Literal, TypedDict

import pyotp
import qrcode
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from sentientedge.errors import AuthError, SentientEdgeError

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024  # argon2 takes any length; this only bounds what we agree to hash
DEFAULT_ISSUER = "SentientEdge"

# RFC 6238 parameters. Changing one invalidates every enrolled authenticator.
TOTP_PERIOD_S = 30
TOTP_DIGITS = 6
TOTP_DRIFT_STEPS = 1  # accept codes of the steps now-1, now and now+1

# argon2id, 64 MiB, 2 passes, 2 lanes: one verify takes about 70 ms on this project's 2-core
# hosts (the library default, 3 passes and 4 lanes, took about 105 ms there). Above OWASP's
# minimum (19 MiB, 2 passes). Hashes keep their own parameters, so raising these later only
# rehashes each admin's password at their next login (see check_login).
PASSWORD_HASHER = PasswordHasher(time_cost=2, memory_cost=65_536, parallelism=2)

ADMIN_AMR = ("pwd", "otp")  # RFC 8176 method references: a password and a one-time code
ADMIN_TOKEN_TTL_S = 900  # suggested lifetime of an admin JWT; keep it <= JWT_MAX_TTL

RECORD_VERSION = "1"

REFUSED_REASON = "bad credentials"


class EnrolmentRefused(SentientEdgeError):
    """An admin name, password or issuer that enrolment does not accept."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AdminRecordError(SentientEdgeError):
    """A stored admin record that cannot be read back."""


class LoginRefused(AuthError):
    """A login that failed. ``reason`` (and ``str()``) is safe to send; ``detail`` is not.

    ``detail`` is one of :data:`LOGIN_FAILURE_DETAILS`, for the audit log.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(REFUSED_REASON)
        self.detail = detail


LOGIN_FAILURE_DETAILS = (
    "unknown_admin",  # no record under that name
    "password",  # password wrong
    "otp",  # password right, code wrong, malformed or outside the drift window
    "otp_replayed",  # password right, code right but its step was already used
    "bad_record",  # the stored password hash is not an argon2 hash
)


# Records


@dataclass(frozen=True)
class AdminRecord:
    """What is stored for one admin. Build with :func:`enrol`; update with :func:`check_login`."""

    name: str
    password_hash: str = field(repr=False)
    totp_secret: str = field(repr=False)  # base32, as in the provisioning URI
    created: float  # Unix seconds
    last_otp_step: int = 0  # the TOTP step (Unix seconds // 30) of the last accepted code

    def to_mapping(self) -> dict[str, str]:
        """Fields for a Redis hash (``HSET admin:{name} mapping=...``)."""
        return {
            "v": RECORD_VERSION,
            "name": self.name,
            "password_hash": self.password_hash,
            "totp_secret": self.totp_secret,
            "created": repr(float(self.created)),
            "last_otp_step": str(int(self.last_otp_step)),
        }

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str] | Mapping[bytes, bytes]) -> AdminRecord:
        """The record stored by :meth:`to_mapping`; bytes (a Redis reply) are decoded."""
        fields = {_text(key): _text(value) for key, value in mapping.items()}
        version = fields.get("v")
        if version != RECORD_VERSION:
            raise AdminRecordError(f"admin record version {version!r} not supported")
        missing = [
            key
            for key in ("name", "password_hash", "totp_secret", "created", "last_otp_step")
            if key not in fields
        ]
        if missing:
            raise AdminRecordError(f"admin record lacks {', '.join(missing)}")
        name = fields["name"]
        if not NAME_RE.fullmatch(name):
            raise AdminRecordError("admin record has a bad name")
        if not _is_base32(fields["totp_secret"]):
            raise AdminRecordError("admin record has a bad totp_secret")
        try:
            created = float(fields["created"])
            last_otp_step = int(fields["last_otp_step"])
        except ValueError:
            raise AdminRecordError("admin record has a bad created or last_otp_step") from None
        if not math.isfinite(created) or last_otp_step < 0:
            raise AdminRecordError("admin record has a bad created or last_otp_step")
        return cls(
            name=name,
            password_hash=fields["password_hash"],
            totp_secret=fields["totp_secret"],
            created=created,
            last_otp_step=last_otp_step,
        )


def _text(value: str | bytes) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise AdminRecordError("admin record is not utf-8") from None
    return value


def _is_base32(secret: str) -> bool:
    if not secret:
        return False
    try:
        base64.b32decode(secret + "=" * (-len(secret) % 8), casefold=True)
    except (binascii.Error, ValueError):
        return False
    return True


# Enrolment


@dataclass(frozen=True)
class Enrolment:
    """A new admin: ``record`` to store, ``uri`` to show once (it holds the TOTP secret)."""

    record: AdminRecord
    uri: str = field(repr=False)


def check_name(name: str) -> str:
    """``name`` if it is 1-64 characters of [A-Za-z0-9_.-], else :class:`EnrolmentRefused`."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise EnrolmentRefused("admin name must be 1-64 characters of [A-Za-z0-9_.-]")
    return name


def _normalise_password(password: str) -> str:
    return unicodedata.normalize("NFKC", password)


def _check_password(password: str) -> str:
    if not isinstance(password, str):
        raise EnrolmentRefused("password must be a string")
    password = _normalise_password(password)
    if len(password) < MIN_PASSWORD_CHARS:
        raise EnrolmentRefused(f"password must be at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise EnrolmentRefused(f"password must be at most {MAX_PASSWORD_CHARS} characters")
    return password


def _check_issuer(issuer: str) -> str:
    # The label of the URI is "issuer:name", so a colon would split it in the wrong place.
    if not isinstance(issuer, str) or not 1 <= len(issuer) <= 64 or ":" in issuer:
        raise EnrolmentRefused("issuer must be 1-64 characters without ':'")
    if not issuer.isprintable():
        raise EnrolmentRefused("issuer must be printable")
    return issuer


def _totp(secret: str) -> pyotp.TOTP:
    return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_PERIOD_S)


def enrol(
    name: str,
    password: str,
    *,
    issuer: str = DEFAULT_ISSUER,
    now: float | None = None,
    hasher: PasswordHasher = PASSWORD_HASHER,
) -> Enrolment:
    """A new admin record (a fresh 160-bit TOTP secret) and its ``otpauth://`` URI.

    Enrolling an existing name again is a reset: the new record replaces the old one.
    """
    name = check_name(name)
    password = _check_password(password)
    issuer = _check_issuer(issuer)
    secret = pyotp.random_base32()  # 32 base32 characters: 160 bits (RFC 4226 section 4)
    record = AdminRecord(
        name=name,
        password_hash=hasher.hash(password),
        totp_secret=secret,
        created=time.time() if now is None else now,
    )
    return Enrolment(record, _totp(secret).provisioning_uri(name=name, issuer_name=issuer))


QrStyle = Literal["ansi", "dark", "light"]

# 256-colour palette entries 16 (#000000) and 231 (#ffffff): fixed, unlike the 16 themed ones.
_ANSI_BLACK_ON_WHITE = "\x1b[38;5;16;48;5;231m"
_ANSI_RESET = "\x1b[0m"
# Half blocks indexed by (top inked, bottom inked).
_HALF_BLOCKS = {(False, False): " ", (True, False): "▀", (False, True): "▄", (True, True): "█"}


def qr_text(uri: str, *, style: QrStyle = "ansi") -> str:
    """``uri`` as a QR code for a terminal, two modules rows to a line of half blocks.

    - ``"ansi"`` (default): black modules on white, with explicit colours, so it scans from a
      dark or a light terminal alike (needs 256-colour support, which nearly all have).
    - ``"dark"``: plain text for a dark background: the glyphs draw the light modules.
    - ``"light"``: plain text for a light background: the glyphs draw the dark modules.

    It includes the 4-module quiet zone the QR standard asks for.
    """
    if style not in ("ansi", "dark", "light"):
        raise ValueError(f"qr style must be ansi, dark or light, not {style!r}")
    code = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=4)
    code.add_data(uri)
    code.make(fit=True)
    dark: list[list[bool]] = [[bool(module) for module in row] for row in code.get_matrix()]
    if len(dark) % 2:
        dark.append([False] * len(dark[0]))  # one more light row: part of the quiet zone
    ink_is_dark = style != "dark"
    lines = []
    for top, bottom in zip(dark[::2], dark[1::2], strict=True):
        line = "".join(
            _HALF_BLOCKS[(upper == ink_is_dark, lower == ink_is_dark)]
            for upper, lower in zip(top, bottom, strict=True)
        )
        lines.append(_ANSI_BLACK_ON_WHITE + line + _ANSI_RESET if style == "ansi" else line)
    return "\n".join(lines) + "\n"


# Login


@lru_cache(maxsize=4)
def _dummy_hash(hasher: PasswordHasher) -> str:
    return hasher.hash(secrets.token_hex(16))


def check_login(
    record: AdminRecord | None,
    password: str,
    otp: str,
    *,
    now: float,
    hasher: PasswordHasher = PASSWORD_HASHER,
) -> AdminRecord:
    """The record to store after a good login, else :class:`LoginRefused`.

    ``record`` is None when no admin has that name: the password is then checked against a
    dummy hash, so the answer takes as long as for a real admin. ``now`` is Unix seconds.
    The returned record has the step of the code just used as ``last_otp_step`` and, when
    ``hasher``'s parameters changed, a new password hash. The caller must store it before
    answering, and only if the stored ``last_otp_step`` is still lower (compare-and-set), or
    two logins racing with one code would both pass.
    """
    password = _normalise_password(password) if isinstance(password, str) else ""
    if record is None:
        with contextlib.suppress(VerificationError):
            hasher.verify(_dummy_hash(hasher), password)
        raise LoginRefused("unknown_admin")
    try:
        hasher.verify(record.password_hash, password)
    except VerificationError:
        raise LoginRefused("password") from None
    except InvalidHashError:
        raise LoginRefused("bad_record") from None
    step = _otp_step(record.totp_secret, otp, now)
    if step is None:
        raise LoginRefused("otp")
    if step <= record.last_otp_step:
        raise LoginRefused("otp_replayed")
    password_hash = record.password_hash
    if hasher.check_needs_rehash(password_hash):
        password_hash = hasher.hash(password)
    return replace(record, password_hash=password_hash, last_otp_step=step)


def _otp_step(secret: str, otp: str, now: float) -> int | None:
    """The latest step within the drift window whose code is ``otp``, else None."""
    if not isinstance(otp, str):
        return None
    otp = otp.replace(" ", "")  # apps show "123 456"
    if len(otp) != TOTP_DIGITS or not otp.isascii() or not otp.isdigit():
        return None
    totp = _totp(secret)
    current = math.floor(now / TOTP_PERIOD_S)
    matched = None
    # Compare with every candidate, without stopping early (hmac.compare_digest each).
    for step in range(current - TOTP_DRIFT_STEPS, current + TOTP_DRIFT_STEPS + 1):
        if hmac.compare_digest(totp.generate_otp(step), otp):
            matched = step
    return matched


# Throttling


class _FailureLog:
    """The last ``limit`` failure times of each key, for at most ``max_keys`` keys."""

    __slots__ = ("_keys", "limit", "max_keys", "window_s")

    def __init__(self, limit: int, window_s: float, max_keys: int) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        # Least recently failed first, so eviction drops the key least likely to be blocked.
        self._keys: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._keys.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._keys[key]
            return None
        return times

    def wait(self, key: str, now: float) -> float | None:
        times = self._recent(key, now)
        if times is None or len(times) < self.limit:
            return None
        return times[0] + self.window_s - now

    def add(self, key: str, now: float) -> None:
        times = self._recent(key, now)
        if times is None:
            times = deque(maxlen=self.limit)
            self._keys[key] = times
        self._keys.move_to_end(key)
        times.append(now)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    def forget(self, key: str) -> None:
        self._keys.pop(key, None)

    def __len__(self) -> int:
        return len(self._keys)


def address_key(address: str) -> str:
    """The key one client's failures are counted under: an IPv4 address, or the /64 of an
    IPv6 one (one host usually holds a whole /64). Anything else is used as it is."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class LoginThrottle:
    """Failed logins counted per admin name and per client address, each in a sliding window.

    The caller asks :meth:`check` before checking credentials (a number means answer 429 with
    that ``Retry-After`` and check nothing), then reports :meth:`failed` or
    :meth:`succeeded`. ``now`` is monotonic seconds. Each table keeps at most ``max_keys``
    keys and evicts the one that failed least recently.

    A success forgets the name's failures only: a client cannot clear its address's count by
    logging in as an admin it controls between guesses at other names.
    """

    def __init__(
        self,
        *,
        max_per_name: int = 5,
        max_per_address: int = 20,
        window_s: float = 900.0,
        max_keys: int = 10_000,
    ) -> None:
        if max_per_name < 1 or max_per_address < 1 or window_s <= 0 or max_keys < 1:
            raise ValueError("throttle limits, window and max_keys must be positive")
        self._names = _FailureLog(max_per_name, window_s, max_keys)
        self._addresses = _FailureLog(max_per_address, window_s, max_keys)
        self.max_per_name = max_per_name
        self.max_per_address = max_per_address
        self.window_s = window_s

    def shared_subjects(self, name: str, address: str) -> list[tuple[str, int]]:
        """What the router-wide count (in Redis) keeps for this attempt: (subject, limit) for
        the name and for the address, as this process counts them."""
        return [
            (f"name:{name}", self.max_per_name),
            (f"addr:{address_key(address)}", self.max_per_address),
        ]

    def check(self, name: str, address: str, now: float) -> float | None:
        """Seconds to wait before this name may be tried from this address, or None."""
        waits = [
            wait
            for wait in (
                self._names.wait(name, now),
                self._addresses.wait(address_key(address), now),
            )
            if wait is not None
        ]
        return max(waits) if waits else None

    def failed(self, name: str, address: str, now: float) -> None:
        self._names.add(name, now)
        self._addresses.add(address_key(address), now)

    def succeeded(self, name: str, address: str) -> None:
        del address  # see the class docstring: the address's failures age out on their own
        self._names.forget(name)

    @property
    def tracked(self) -> tuple[int, int]:
        """How many names and how many addresses have failures on record."""
        return len(self._names), len(self._addresses)


# Admin tokens


class AdminClaims(TypedDict):
    amr: list[str]


def admin_token_claims(name: str) -> AdminClaims:
    """Extra claims of an admin JWT after a login with both factors (a plain dict).

    ``mint_jwt(secret, name, Role.ADMIN, ttl, **admin_token_claims(name))``, with a short
    ``ttl`` (:data:`ADMIN_TOKEN_TTL_S`).
    """
    check_name(name)
    return AdminClaims(amr=list(ADMIN_AMR))


def has_second_factor(claims_amr: object) -> bool:
    """Whether a token's ``amr`` claim (as decoded, any type) is a list naming ``"otp"``."""
    if not isinstance(claims_amr, (list, tuple)):
        return False  # a bare string "pwd otp" is not a list of methods
    return "otp" in _strings(claims_amr)


def _strings(items: Collection[object]) -> set[str]:
    return {item for item in items if isinstance(item, str)}
