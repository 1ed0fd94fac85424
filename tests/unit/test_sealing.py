"""Sealing: payloads at rest open only with their key and context; envelopes only on their topic;
bad settings name the variable and never echo it; the client seals and opens with a fleet key."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import pickle
from typing import Any

import pytest

from sentientedge import codec
from sentientedge.client import Client, Message, Welcome, _Target
from sentientedge.codec import Encoding
from sentientedge.sealing import (
    MAGIC,
    KeyRing,
    SealingError,
    generate_key,
    is_envelope,
    is_sealed,
    open_data,
    open_stored,
    seal_data,
)

OLD = base64.b64encode(bytes(range(32))).decode()
NEW = base64.b64encode(bytes(range(100, 132))).decode()
PAYLOAD = codec.encode_msgpack({"op": "msg", "topic": "drone/7/cmd", "data": {"go": [1, 2.5]}})


def ring(text: str = f"new:{NEW}") -> KeyRing:
    return KeyRing.from_setting(text)


# At rest


def test_round_trip():
    blob = ring().seal(PAYLOAD, b"stream")
    assert is_sealed(blob) and blob.startswith(MAGIC)
    assert PAYLOAD not in blob
    assert ring().open(blob, b"stream") == PAYLOAD


def test_each_seal_has_its_own_nonce():
    keys = ring()
    assert keys.seal(PAYLOAD) != keys.seal(PAYLOAD)


def test_empty_plaintext_and_empty_context():
    keys = ring()
    assert keys.open(keys.seal(b"")) == b""


def test_wrong_context_does_not_open():
    blob = ring().seal(PAYLOAD, b"stream")
    for context in (b"retained", b"", b"stream\x00"):
        with pytest.raises(SealingError, match="does not open"):
            ring().open(blob, context)


@pytest.mark.parametrize("position", [3, 4, 5, 10, 20, -1, -17])
def test_any_changed_byte_does_not_open(position: int):
    blob = bytearray(ring().seal(PAYLOAD, b"stream"))
    blob[position] ^= 0x01
    with pytest.raises(SealingError):
        ring().open(bytes(blob), b"stream")


def test_truncated_blobs_raise_sealing_error_only():
    blob = ring().seal(PAYLOAD)
    for end in range(len(blob)):
        with pytest.raises(SealingError):
            ring().open(blob[:end])


def test_unknown_key_id_does_not_open():
    blob = ring(f"old:{OLD}").seal(PAYLOAD)
    with pytest.raises(SealingError, match="unknown key id"):
        ring(f"new:{NEW}").open(blob)


def test_same_id_other_key_does_not_open():
    blob = ring(f"k:{OLD}").seal(PAYLOAD)
    with pytest.raises(SealingError, match="does not open"):
        ring(f"k:{NEW}").open(blob)


def test_rotation_old_blobs_open_new_ones_use_the_first_key():
    old_blob = ring(f"old:{OLD}").seal(PAYLOAD, b"stream")
    rotated = ring(f"new:{NEW}, old:{OLD}")
    assert rotated.current_key_id == "new"
    assert rotated.key_ids == ("new", "old")
    assert rotated.open(old_blob, b"stream") == PAYLOAD
    new_blob = rotated.seal(PAYLOAD, b"stream")
    assert b"new" in new_blob[: len(MAGIC) + 5]
    with pytest.raises(SealingError, match="unknown key id"):
        ring(f"old:{OLD}").open(new_blob, b"stream")


def test_bare_key_id_is_derived_from_the_key():
    keys = ring(NEW)
    assert keys.current_key_id == hashlib.sha256(base64.b64decode(NEW)).hexdigest()[:8]
    # The same key given with its derived id opens what the bare one sealed.
    assert ring(f"{keys.current_key_id}:{NEW}").open(keys.seal(b"x")) == b"x"


def test_url_safe_and_unpadded_keys_are_accepted():
    raw = bytes([0xFB, 0xFF] * 16)
    standard = base64.b64encode(raw).decode()
    urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert ring(standard).current_key_id == ring(urlsafe).current_key_id


def test_plaintext_passes_through_open_stored():
    assert not is_sealed(PAYLOAD)
    assert open_stored(ring(), PAYLOAD) == PAYLOAD
    assert open_stored(None, PAYLOAD) == PAYLOAD
    assert open_stored(None, b"") == b""


def test_open_stored_opens_sealed_and_needs_a_ring_for_them():
    blob = ring().seal(PAYLOAD, b"stream")
    assert open_stored(ring(), blob, b"stream") == PAYLOAD
    with pytest.raises(SealingError, match="ENCRYPTION_KEY"):
        open_stored(None, blob, b"stream")
    with pytest.raises(SealingError):
        open_stored(ring(), blob, b"retained")


def test_no_messagepack_value_looks_sealed():
    # 0xC1 is never used by MessagePack: nothing stored before encryption starts with it.
    values: list[Any] = [None, 0, -1, 1.5, "", "x" * 40, b"\xc1SE", [], {}, {"op": "msg"}]
    for value in values:
        assert not is_sealed(codec.encode_msgpack({"v": value}))
        assert not is_sealed(codec.encode_msgpack(value))


def test_unknown_version_does_not_open():
    blob = bytearray(ring().seal(PAYLOAD))
    blob[3] = 2
    with pytest.raises(SealingError, match="version 2"):
        ring().open(bytes(blob))


def test_generate_key_makes_distinct_32_byte_keys():
    first, second = generate_key(), generate_key()
    assert first != second
    assert len(base64.b64decode(first, validate=True)) == 32
    assert ring(first).open(ring(first).seal(b"x")) == b"x"


# Settings


SECRET = base64.b64encode(b"s3cr3t-s3cr3t-s3cr3t-s3cr3t!!").decode()  # 29 bytes


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        (" , ", "empty"),
        (f"{NEW},", "entry 2 of 2 is empty"),
        (SECRET, "29 bytes, not 32"),
        (f"kid:{SECRET}", "29 bytes, not 32"),
        (base64.b64encode(bytes(33)).decode(), "33 bytes"),
        ("not base64 at all!", "not valid base64"),
        (f"bad kid:{NEW}", "key id"),
        (f"{'k' * 65}:{NEW}", "key id"),
        (f":{NEW}", "key id"),
        (f"a:{NEW},a:{OLD}", "entry 2 of 2 has the same key id as entry 1"),
        (f"{NEW},{NEW}", "same key id"),
    ],
)
def test_bad_settings_name_the_variable_and_do_not_echo(text: str, reason: str):
    with pytest.raises(ValueError, match=reason) as caught:
        KeyRing.from_setting(text)
    message = str(caught.value)
    assert message.startswith("ENCRYPTION_KEY: ")
    for secret in (SECRET, NEW, OLD, SECRET[:12], NEW[:12], OLD[:12]):
        assert secret not in message


def test_client_setting_names_fleet_key():
    with pytest.raises(ValueError, match=r"^fleet_key: "):
        KeyRing.from_setting("nope", "fleet_key")


def test_key_material_stays_inside_the_ring():
    keys = ring(f"new:{NEW},old:{OLD}")
    assert repr(keys) == "KeyRing(key_ids=('new', 'old'))"
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(keys)
    with pytest.raises(SealingError) as caught:
        ring(f"new:{OLD}").open(keys.seal(PAYLOAD))
    assert NEW not in str(caught.value) and OLD not in str(caught.value)


# End to end


def test_envelope_round_trip():
    data = {"lat": 52.1, "lon": 4.3, "tags": ["a", "ü"], "ok": True, "n": None}
    envelope = seal_data(ring(), "fleet/a/orders", data)
    assert is_envelope(envelope)
    assert set(envelope) == {"e2e", "kid", "nonce", "ct"}
    assert envelope["e2e"] == "se1-aesgcm" and envelope["kid"] == "new"
    assert "52.1" not in envelope["ct"]
    # JSON-safe, and survives both encodings as the router carries it.
    for encoding in Encoding:
        carried = codec.decode_frame(codec.encode({"op": "msg", "data": envelope}, encoding))
        assert open_data(ring(), "fleet/a/orders", carried["data"]) == data


@pytest.mark.parametrize("data", [None, 0, "text", [1, [2]], {"nested": {"x": -1.5}}])
def test_envelope_round_trip_of_any_json(data: Any):
    assert open_data(ring(), "t", seal_data(ring(), "t", data)) == data


def test_envelope_is_bound_to_its_topic():
    envelope = seal_data(ring(), "fleet/a/orders", {"go": 1})
    with pytest.raises(SealingError, match="does not open"):
        open_data(ring(), "fleet/b/orders", envelope)


def test_envelope_opens_after_rotation_and_not_with_other_keys():
    envelope = seal_data(ring(f"old:{OLD}"), "t", [1])
    assert open_data(ring(f"new:{NEW},old:{OLD}"), "t", envelope) == [1]
    with pytest.raises(SealingError, match="unknown key id"):
        open_data(ring(f"new:{NEW}"), "t", envelope)


def test_tampered_envelopes_raise_sealing_error_only():
    envelope = seal_data(ring(), "t", {"go": 1})
    ct = bytearray(base64.b64decode(envelope["ct"]))
    ct[0] ^= 1
    broken: list[dict[str, Any]] = [
        {**envelope, "ct": base64.b64encode(bytes(ct)).decode()},
        {**envelope, "nonce": base64.b64encode(bytes(12)).decode()},
        {**envelope, "nonce": "AAAA"},
        {**envelope, "ct": "!!"},
        {**envelope, "ct": ""},
        {**envelope, "kid": 7},
        {**envelope, "kid": "ünknown"},
        {**envelope, "e2e": "se9-other"},
        {k: v for k, v in envelope.items() if k != "nonce"},
        {"e2e": 1},
    ]
    for candidate in broken:
        with pytest.raises(SealingError):
            open_data(ring(), "t", candidate)


def test_what_is_an_envelope():
    assert is_envelope({"e2e": "anything"})
    for data in (None, "e2e", [], {}, {"e2e": None}, {"E2E": "se1-aesgcm"}, [{"e2e": "x"}]):
        assert not is_envelope(data)


def test_data_that_is_not_json_is_refused():
    for data in (b"bytes", float("nan"), {1j: 1}, object()):
        with pytest.raises(ValueError, match="not JSON"):
            seal_data(ring(), "t", data)


# The client, on a fake connection (no sockets)


class FakeConnection:
    """Stands in for a websockets ClientConnection: records what is sent, yields what is fed."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.incoming: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.close_code: int | None = None
        self.close_reason = ""

    async def send(self, data: bytes | str) -> None:
        self.sent.append(codec.decode_frame(data))

    def feed(self, frame: dict[str, Any]) -> None:
        self.incoming.put_nowait(codec.encode_msgpack(frame))

    def __aiter__(self) -> FakeConnection:
        return self

    async def __anext__(self) -> bytes:
        item = await self.incoming.get()
        if item is None:
            raise StopAsyncIteration
        return item

    async def close(self, code: int = 1000) -> None:
        self.close_code = code
        self.incoming.put_nowait(None)


def client(fleet_key: str | None) -> tuple[Client, FakeConnection]:
    ws = FakeConnection()
    welcome = Welcome("s1", False, "ingress-0", {})
    target = _Target("ws://fake/ws", {}, {}, Encoding.MSGPACK, 1.0)
    return Client(ws, welcome, target, fleet_key=fleet_key), ws  # type: ignore[arg-type]


async def received(ws: FakeConnection, station: Client, data: Any) -> Message:
    ws.feed({"op": "msg", "topic": "fleet/a/orders", "data": data, "qos": 0, "from": "op"})
    return await station.recv(timeout=1.0)


async def test_client_publishes_sealed_data():
    drone, ws = client(f"new:{NEW}")
    await drone.publish("fleet/a/orders", {"go": 1})
    await drone.publish("fleet/a/orders", None, retain=True)  # null clears: never sealed
    sealed, cleared = ws.sent
    assert is_envelope(sealed["data"])
    assert open_data(ring(), "fleet/a/orders", sealed["data"]) == {"go": 1}
    assert cleared["data"] is None
    await drone.close()


async def test_client_opens_envelopes_and_marks_what_did_not_open():
    station, ws = client(f"new:{NEW},old:{OLD}")
    opened = await received(ws, station, seal_data(ring(f"old:{OLD}"), "fleet/a/orders", [1]))
    assert (opened.data, opened.sealed, opened.seal_error) == ([1], True, None)

    replayed = seal_data(ring(), "fleet/b/orders", [2])
    wrong = await received(ws, station, replayed)
    assert (wrong.data, wrong.sealed) == (replayed, False)
    assert wrong.seal_error is not None and "does not open" in wrong.seal_error

    plain = await received(ws, station, {"online": True})
    assert (plain.data, plain.sealed, plain.seal_error) == ({"online": True}, False, None)
    await station.close()


async def test_client_without_a_fleet_key_hands_envelopes_over_as_they_are():
    station, ws = client(None)
    envelope = seal_data(ring(), "fleet/a/orders", [1])
    message = await received(ws, station, envelope)
    assert (message.data, message.sealed, message.seal_error) == (envelope, False, None)
    await station.publish("fleet/a/orders", {"go": 1})
    assert ws.sent[-1]["data"] == {"go": 1}
    await station.close()


async def test_client_refuses_a_bad_fleet_key_before_connecting():
    with pytest.raises(ValueError, match=r"^fleet_key: ") as caught:
        await Client.connect("ws://127.0.0.1:1/ws", fleet_key=SECRET)
    assert SECRET not in str(caught.value)
