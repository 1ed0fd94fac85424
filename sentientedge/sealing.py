"""Sealing: AES-256-GCM for payloads at rest in Redis, and end-to-end envelopes for clients.

Rules for this module:
- Pure: bytes and values in, bytes and values out. No sockets, no Redis, no Ray; randomness
  comes from ``os.urandom`` only.
- Key material never leaves a :class:`KeyRing`: it is not kept as bytes, not in ``repr``, not in
  any error message. Errors say which entry of the setting is wrong, never what it holds.
- What cannot be opened raises :class:`SealingError`, whatever the reason (unknown key id,
  tampered bytes, wrong context, truncated blob); never anything else.

Keys (``ENCRYPTION_KEY``, and a client's ``fleet_key``): comma-separated entries, each either
``KID:BASE64`` or a bare ``BASE64`` of exactly 32 bytes (standard or URL-safe alphabet, padding
optional). A key id is 1 to 64 characters of ``[A-Za-z0-9_.-]``; a bare key's id is the first 8
hex digits of the SHA-256 of the key. The FIRST entry seals; every entry opens. To rotate: put
the new key first and keep the old ones after it until nothing sealed with them is left.

Sealed blob (encryption at rest), all lengths in bytes::

    magic    3   0xC1 "S" "E"   (0xC1 is the one byte MessagePack never uses: no MessagePack
                                 value, so no payload stored before encryption, starts with it)
    version  1   0x01
    kid_len  1   n, 1..64
    kid      n   key id, ASCII
    nonce    12  random
    ct       *   AES-256-GCM ciphertext followed by its 16-byte tag

The associated data is the header (magic to kid) followed by the caller's ``context``, so a
blob opens only under the context it was sealed with, and a changed header does not open.
Overhead: 33 bytes + the key id (41 with a derived id).

A random 96-bit nonce per seal keeps AES-GCM safe for up to 2**32 seals per key (NIST SP
800-38D, 8.3): rotate the sealing key well before it has sealed that many payloads.

End-to-end envelope (a message's ``data``, sealed by a client for its fleet; the router routes
it without being able to read it)::

    {"e2e": "se1-aesgcm", "kid": KID, "nonce": BASE64 (12 bytes), "ct": BASE64}

``ct`` is AES-256-GCM of the UTF-8 JSON encoding of the original ``data``, tag appended, with the
topic's UTF-8 bytes as associated data: an envelope published again on another topic does not
open. Base64 is the standard alphabet with padding. Any map whose ``e2e`` field is a string is
an envelope (see ``/work/notes/helpers/e2e-envelope.md`` for client authors).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Iterable
from typing import Any, TypeGuard

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sentientedge.errors import SentientEdgeError

MAGIC = b"\xc1SE"
VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
SETTING = "ENCRYPTION_KEY"
E2E_SCHEME = "se1-aesgcm"

_HEAD = len(MAGIC) + 2  # magic, version, kid_len
_KID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_URLSAFE = str.maketrans("-_", "+/")
_json_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


_json_decoder = json.JSONDecoder(parse_constant=_reject_constant)


class SealingError(SentientEdgeError):
    """A sealed blob or envelope that does not open. Never carries key material."""


def generate_key() -> str:
    """A new key for ``ENCRYPTION_KEY`` or a fleet key: base64 of 32 random bytes."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def key_id_of(key: bytes) -> str:
    """The key id of a bare key: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:8]


class KeyRing:
    """The keys of one setting: the first seals, all of them open."""

    __slots__ = ("_aeads", "_current", "_header", "_ids")

    def __init__(self, keys: Iterable[tuple[str, bytes]]) -> None:
        """``keys``: (key id, 32-byte key) pairs, the sealing key first."""
        self._aeads: dict[bytes, AESGCM] = {}
        ids: list[str] = []
        for kid, key in keys:
            if not _KID.fullmatch(kid):
                raise ValueError("key id must be 1 to 64 characters of A-Z a-z 0-9 _ . -")
            if len(key) != KEY_BYTES:
                raise ValueError(f"key must be exactly {KEY_BYTES} bytes")
            raw = kid.encode("ascii")
            if raw in self._aeads:
                raise ValueError("two keys have the same key id")
            self._aeads[raw] = AESGCM(bytes(key))
            ids.append(kid)
        if not ids:
            raise ValueError("a key ring needs at least one key")
        self._ids = tuple(ids)
        self._current = self._aeads[ids[0].encode("ascii")]
        self._header = _header(ids[0].encode("ascii"))

    @classmethod
    def from_setting(cls, text: str, name: str = SETTING) -> KeyRing:
        """Parse ``KID:BASE64,BASE64,...`` (see the module docstring).

        Raises ``ValueError`` naming ``name`` and the entry, never echoing the value.
        """
        entries = text.split(",")
        keys: list[tuple[str, bytes]] = []
        seen: dict[str, int] = {}
        for number, entry in enumerate(entries, 1):
            where = f"{name}: entry {number} of {len(entries)}"
            entry = entry.strip()
            if not entry:
                raise ValueError(f"{where} is empty (expected KID:BASE64 or BASE64)")
            kid, sep, encoded = entry.rpartition(":")
            key = _b64_key(encoded)
            if key is None:
                raise ValueError(f"{where}: the key is not valid base64")
            if len(key) != KEY_BYTES:
                raise ValueError(f"{where}: the key is {len(key)} bytes, not {KEY_BYTES}")
            if not sep:
                kid = key_id_of(key)
            elif not _KID.fullmatch(kid):
                raise ValueError(
                    f"{where}: the key id must be 1 to 64 characters of A-Z a-z 0-9 _ . -"
                )
            if kid in seen:
                raise ValueError(f"{where} has the same key id as entry {seen[kid]}")
            seen[kid] = number
            keys.append((kid, key))
        return cls(keys)

    @property
    def current_key_id(self) -> str:
        """The id of the key that seals."""
        return self._ids[0]

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key id, the sealing one first."""
        return self._ids

    def __repr__(self) -> str:
        return f"KeyRing(key_ids={self._ids!r})"

    def __reduce__(self) -> Any:
        # Key material never travels by pickle (Ray arguments, logs): build the ring from the
        # setting where it is used.
        raise TypeError("a KeyRing cannot be pickled: build it from its setting where it is used")

    def seal(self, plaintext: bytes, context: bytes = b"") -> bytes:
        """``plaintext`` sealed with the current key, bound to ``context``."""
        header = self._header
        nonce = os.urandom(NONCE_BYTES)
        aad = header + context if context else header
        return header + nonce + self._current.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, context: bytes = b"") -> bytes:
        """The plaintext of a sealed ``blob``; :class:`SealingError` if it does not open."""
        if blob[:3] != MAGIC:
            raise SealingError("not a sealed payload")
        if len(blob) < _HEAD:
            raise SealingError("sealed payload truncated")
        if blob[3] != VERSION:
            raise SealingError(f"unsupported sealed payload version {blob[3]}")
        kid_end = _HEAD + blob[4]
        ct_start = kid_end + NONCE_BYTES
        if len(blob) < ct_start + TAG_BYTES:
            raise SealingError("sealed payload truncated")
        aead = self._aeads.get(blob[_HEAD:kid_end])
        if aead is None:
            raise SealingError("sealed with an unknown key id")
        header = blob[:kid_end]
        try:
            return aead.decrypt(
                blob[kid_end:ct_start], blob[ct_start:], header + context if context else header
            )
        except InvalidTag:
            raise SealingError("sealed payload does not open: tampered or wrong context") from None

    def _seal_raw(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes, bytes]:
        nonce = os.urandom(NONCE_BYTES)
        return self._ids[0], nonce, self._current.encrypt(nonce, plaintext, aad)

    def _open_raw(self, kid: str, nonce: bytes, ct: bytes, aad: bytes) -> bytes:
        aead = self._aeads.get(kid.encode("ascii", "replace"))
        if aead is None:
            raise SealingError("sealed with an unknown key id")
        try:
            return aead.decrypt(nonce, ct, aad)
        except InvalidTag:
            raise SealingError("does not open: tampered, wrong topic or wrong key") from None


def is_sealed(blob: bytes) -> bool:
    """Whether ``blob`` is a sealed payload (by its magic prefix; it may still not open)."""
    return blob[:3] == MAGIC


def open_stored(ring: KeyRing | None, blob: bytes, context: bytes = b"") -> bytes:
    """A payload read from Redis: sealed ones opened, ones stored before encryption unchanged.

    A sealed payload without a ring (``ENCRYPTION_KEY`` unset) raises :class:`SealingError`.
    """
    if blob[:3] != MAGIC:
        return blob
    if ring is None:
        raise SealingError(f"sealed payload but no {SETTING} is set")
    return ring.open(blob, context)


def is_envelope(data: Any) -> TypeGuard[dict[str, Any]]:
    """Whether a message's ``data`` is an end-to-end envelope: a map whose ``e2e`` is a string."""
    return type(data) is dict and type(data.get("e2e")) is str


def seal_data(ring: KeyRing, topic: str, data: Any) -> dict[str, str]:
    """``data`` in an envelope only ``ring``'s keys open, and only on ``topic``.

    ``data`` must be JSON: maps with string keys, lists, strings, finite numbers, booleans,
    null; anything else (bytes, NaN) raises ``ValueError``.
    """
    try:
        plaintext = _json_encoder.encode(data).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"data to seal is not JSON: {exc}") from None
    kid, nonce, ct = ring._seal_raw(plaintext, topic.encode("utf-8"))
    return {
        "e2e": E2E_SCHEME,
        "kid": kid,
        "nonce": base64.b64encode(nonce).decode("ascii"),
        "ct": base64.b64encode(ct).decode("ascii"),
    }


def open_data(ring: KeyRing, topic: str, envelope: dict[str, Any]) -> Any:
    """The ``data`` sealed in ``envelope`` for ``topic``; :class:`SealingError` otherwise."""
    if not is_envelope(envelope):
        raise SealingError("not an envelope")
    if envelope["e2e"] != E2E_SCHEME:
        raise SealingError("unknown envelope scheme")
    kid, nonce_text, ct_text = envelope.get("kid"), envelope.get("nonce"), envelope.get("ct")
    if not (isinstance(kid, str) and isinstance(nonce_text, str) and isinstance(ct_text, str)):
        raise SealingError("envelope lacks a string kid, nonce or ct")
    try:
        nonce = base64.b64decode(nonce_text, validate=True)
        ct = base64.b64decode(ct_text, validate=True)
    except (binascii.Error, ValueError):
        raise SealingError("envelope nonce or ct is not base64") from None
    if len(nonce) != NONCE_BYTES or len(ct) < TAG_BYTES:
        raise SealingError("envelope nonce or ct has the wrong length")
    plaintext = ring._open_raw(kid, nonce, ct, topic.encode("utf-8"))
    try:
        return _json_decoder.decode(plaintext.decode("utf-8"))
    except (ValueError, RecursionError):
        raise SealingError("envelope opens but does not hold JSON") from None


def _header(kid: bytes) -> bytes:
    return MAGIC + bytes((VERSION, len(kid))) + kid


def _b64_key(text: str) -> bytes | None:
    text = text.strip()
    if not text or len(text) > 4 * KEY_BYTES:
        return None
    text = text.translate(_URLSAFE)
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
