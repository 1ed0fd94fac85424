"""Admin enrolment, password + TOTP login, throttling and admin claims, with a fixed clock."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote, urlparse

import pyotp
import pytest
import qrcode
from argon2 import PasswordHasher

from sentientedge.admins import (
    AdminRecord,
    AdminRecordError,
    EnrolmentRefused,
    LoginRefused,
    LoginThrottle,
    address_key,
    admin_token_claims,
    check_login,
    enrol,
    has_second_factor,
    qr_text,
)
from sentientedge.auth import Role, mint_jwt, verify_jwt
from sentientedge.errors import AuthError

# The cheapest argon2id the library accepts: the tests check logic, not hashing cost.
FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORD = "correct horse battery"
NOW = 1_700_000_010.0  # Unix seconds, the start of a 30 s step
STEP = int(NOW // 30)


def enrolled(name: str = "alice") -> AdminRecord:
    return enrol(name, PASSWORD, now=NOW - 3600, hasher=FAST).record


def code(record: AdminRecord, at: float) -> str:
    return pyotp.TOTP(record.totp_secret).at(at)


def login(record: AdminRecord | None, password: str, otp: str, now: float = NOW) -> AdminRecord:
    return check_login(record, password, otp, now=now, hasher=FAST)


def refused(record: AdminRecord | None, password: str, otp: str, now: float = NOW) -> str:
    with pytest.raises(LoginRefused) as caught:
        login(record, password, otp, now)
    assert caught.value.reason == "bad credentials"
    assert str(caught.value) == "bad credentials"
    assert isinstance(caught.value, AuthError)  # answered 401 like every credential error
    return caught.value.detail


# Enrolment


def test_enrol_gives_a_record_and_a_provisioning_uri():
    enrolment = enrol("alice", PASSWORD, now=NOW, hasher=FAST)
    record = enrolment.record
    assert record.name == "alice"
    assert record.created == NOW
    assert record.last_otp_step == 0
    assert PASSWORD not in record.password_hash
    assert FAST.verify(record.password_hash, PASSWORD)
    assert len(record.totp_secret) == 32  # base32 of 160 bits
    uri = urlparse(enrolment.uri)
    assert (uri.scheme, uri.netloc) == ("otpauth", "totp")
    assert unquote(uri.path) == "/SentientEdge:alice"
    query = parse_qs(uri.query)
    assert query["issuer"] == ["SentientEdge"]
    assert query["secret"] == [record.totp_secret]


def test_enrol_with_another_issuer():
    uri = enrol("bob.ops", PASSWORD, issuer="Fleet West", hasher=FAST).uri
    assert "Fleet%20West:bob.ops" in uri
    assert parse_qs(urlparse(uri).query)["issuer"] == ["Fleet West"]


def test_each_enrolment_gets_its_own_secret():
    assert enrolled().totp_secret != enrolled().totp_secret


@pytest.mark.parametrize("name", ["", "a" * 65, "alice smith", "al/ice", "$admin", "ädmin", "a:b"])
def test_bad_names_are_refused(name):
    with pytest.raises(EnrolmentRefused, match=r"^admin name must be 1-64 characters"):
        enrol(name, PASSWORD, hasher=FAST)


@pytest.mark.parametrize("name", ["a", "a" * 64, "Alice_Smith-2.ops"])
def test_good_names_are_accepted(name):
    assert enrol(name, PASSWORD, hasher=FAST).record.name == name


def test_short_password_is_refused():
    with pytest.raises(EnrolmentRefused, match="at least 12 characters"):
        enrol("alice", "x" * 11, hasher=FAST)
    assert enrol("alice", "x" * 12, hasher=FAST).record.name == "alice"


def test_issuer_with_a_colon_is_refused():
    with pytest.raises(EnrolmentRefused, match="issuer"):
        enrol("alice", PASSWORD, issuer="a:b", hasher=FAST)


def test_secrets_stay_out_of_repr():
    enrolment = enrol("alice", PASSWORD, hasher=FAST)
    shown = repr(enrolment)
    assert enrolment.record.totp_secret not in shown
    assert enrolment.record.password_hash not in shown
    assert "otpauth" not in shown


# QR code


def modules_from_text(text: str, ink_is_dark: bool) -> list[list[bool]]:
    """The dark modules drawn by ``qr_text``, read back from its half blocks."""
    halves = {" ": (False, False), "▀": (True, False), "▄": (False, True), "█": (True, True)}
    rows: list[list[bool]] = []
    for line in text.splitlines():
        pairs = [halves[char] for char in line]
        rows.append([upper == ink_is_dark for upper, _ in pairs])
        rows.append([lower == ink_is_dark for _, lower in pairs])
    return rows


def expected_modules(uri: str) -> list[list[bool]]:
    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=4)
    qr.add_data(uri)
    return [[bool(m) for m in row] for row in qr.get_matrix()]


def test_qr_text_is_multi_line_with_explicit_colours():
    text = qr_text(enrol("alice", PASSWORD, hasher=FAST).uri)
    lines = text.splitlines()
    assert len(lines) > 10
    assert all(line.startswith("\x1b[38;5;16;48;5;231m") for line in lines)
    assert all(line.endswith("\x1b[0m") for line in lines)


@pytest.mark.parametrize("style", ["dark", "light", "ansi"])
def test_qr_text_draws_the_qr_matrix(style):
    uri = enrol("alice", PASSWORD, hasher=FAST).uri
    text = re.sub(r"\x1b\[[0-9;]*m", "", qr_text(uri, style=style))
    expected = expected_modules(uri)
    drawn = modules_from_text(text, ink_is_dark=style != "dark")
    assert len(drawn) == len(expected) + len(expected) % 2
    assert drawn[: len(expected)] == expected
    assert not any(drawn[len(expected) :] and drawn[-1])  # padding row, if any, is light
    width = len(expected[0])
    assert all(len(line) == width for line in text.splitlines())


def test_qr_text_rejects_an_unknown_style():
    with pytest.raises(ValueError, match="qr style"):
        qr_text("otpauth://totp/x?secret=AAAA", style="blue")  # type: ignore[arg-type]


# Stored record


def test_record_round_trips_through_a_mapping():
    record = enrolled()
    record = AdminRecord(
        name=record.name,
        password_hash=record.password_hash,
        totp_secret=record.totp_secret,
        created=1_700_000_000.123456,
        last_otp_step=STEP,
    )
    mapping = record.to_mapping()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())
    assert AdminRecord.from_mapping(mapping) == record
    as_redis_replies = {k.encode(): v.encode() for k, v in mapping.items()}
    assert AdminRecord.from_mapping(as_redis_replies) == record


@pytest.mark.parametrize(
    "change",
    [
        {"v": "2"},
        {"last_otp_step": "soon"},
        {"last_otp_step": "-1"},
        {"created": "nan"},
        {"totp_secret": "not base32!"},
        {"name": "no spaces"},
    ],
)
def test_bad_stored_records_are_refused(change):
    mapping = enrolled().to_mapping() | change
    with pytest.raises(AdminRecordError):
        AdminRecord.from_mapping(mapping)


def test_record_missing_a_field_is_refused():
    mapping = enrolled().to_mapping()
    del mapping["totp_secret"]
    with pytest.raises(AdminRecordError, match="lacks totp_secret"):
        AdminRecord.from_mapping(mapping)


# Login


def test_good_login_records_the_step_used():
    record = enrolled()
    updated = login(record, PASSWORD, code(record, NOW))
    assert updated.last_otp_step == STEP
    assert updated.password_hash == record.password_hash
    assert (updated.name, updated.totp_secret) == (record.name, record.totp_secret)


def test_code_typed_with_a_space_is_accepted():
    record = enrolled()
    otp = code(record, NOW)
    assert login(record, PASSWORD, f" {otp[:3]} {otp[3:]} ").last_otp_step == STEP


def test_wrong_password_is_refused():
    record = enrolled()
    assert refused(record, PASSWORD + "!", code(record, NOW)) == "password"


def test_wrong_password_does_not_use_up_the_code():
    record = enrolled()
    refused(record, "not the password", code(record, NOW))
    assert login(record, PASSWORD, code(record, NOW)).last_otp_step == STEP


def test_wrong_code_is_refused():
    record = enrolled()
    good = code(record, NOW)
    bad = f"{(int(good) + 1) % 1_000_000:06d}"
    assert refused(record, PASSWORD, bad) == "otp"


@pytest.mark.parametrize("otp", ["", "12345", "1234567", "abcdef", "١٢٣٤٥٦"])
def test_malformed_code_is_refused(otp):
    assert refused(enrolled(), PASSWORD, otp) == "otp"


def test_replayed_code_is_refused():
    record = enrolled()
    otp = code(record, NOW)
    stored = login(record, PASSWORD, otp)
    assert refused(stored, PASSWORD, otp) == "otp_replayed"
    # Still refused later in the drift window, when the same code is still "valid".
    assert refused(stored, PASSWORD, otp, now=NOW + 29) == "otp_replayed"


def test_code_of_an_earlier_step_than_the_last_used_is_refused():
    record = enrolled()
    stored = login(record, PASSWORD, code(record, NOW))
    assert refused(stored, PASSWORD, code(record, NOW - 30)) == "otp_replayed"


def test_next_step_works_after_a_login():
    record = enrolled()
    stored = login(record, PASSWORD, code(record, NOW))
    assert login(stored, PASSWORD, code(record, NOW + 30), now=NOW + 30).last_otp_step == STEP + 1


@pytest.mark.parametrize("offset", [-30, 0, 30])
def test_one_step_of_clock_drift_either_way_is_accepted(offset):
    record = enrolled()
    expected = STEP + offset // 30
    assert login(record, PASSWORD, code(record, NOW + offset)).last_otp_step == expected


@pytest.mark.parametrize("offset", [-60, 60])
def test_code_two_steps_away_is_refused(offset):
    record = enrolled()
    assert refused(record, PASSWORD, code(record, NOW + offset)) == "otp"


def test_unknown_admin_is_refused_like_a_wrong_password():
    assert refused(None, PASSWORD, "123456") == "unknown_admin"


def test_garbage_password_hash_is_refused():
    record = AdminRecord("alice", "not-a-hash", enrolled().totp_secret, NOW)
    assert refused(record, PASSWORD, code(record, NOW)) == "bad_record"


def test_login_rehashes_a_password_hashed_with_old_parameters():
    record = enrolled()
    stronger = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    updated = check_login(record, PASSWORD, code(record, NOW), now=NOW, hasher=stronger)
    assert updated.password_hash != record.password_hash
    assert stronger.verify(updated.password_hash, PASSWORD)
    assert not stronger.check_needs_rehash(updated.password_hash)


def test_password_is_compared_after_unicode_normalisation():
    record = enrol("alice", "ﬁnally café 12345", hasher=FAST).record  # "ﬁ" ligature, NFC é
    assert login(record, "finally cafe\u0301 12345", code(record, NOW)).last_otp_step == STEP


# Throttle


def fail(throttle: LoginThrottle, times: int, name: str, address: str, now: float) -> None:
    for _ in range(times):
        throttle.failed(name, address, now)


def test_throttle_blocks_a_name_after_its_limit_and_recovers_after_the_window():
    throttle = LoginThrottle(max_per_name=5, max_per_address=20, window_s=900)
    for i in range(4):
        throttle.failed("alice", f"10.0.0.{i}", 1000.0 + i)
    assert throttle.check("alice", "10.0.0.9", 1004.0) is None
    throttle.failed("alice", "10.0.0.4", 1004.0)
    assert throttle.check("alice", "10.0.0.9", 1004.0) == pytest.approx(896.0)
    assert throttle.check("bob", "10.0.0.9", 1004.0) is None  # other names are not blocked
    # The window slides: the first failure ages out at 1900.
    assert throttle.check("alice", "10.0.0.9", 1899.0) == pytest.approx(1.0)
    assert throttle.check("alice", "10.0.0.9", 1900.0) is None


def test_throttle_blocks_an_address_trying_many_names():
    throttle = LoginThrottle(max_per_name=5, max_per_address=20, window_s=900)
    for i in range(20):
        throttle.failed(f"admin{i}", "192.0.2.7", 50.0)
    assert throttle.check("someone-else", "192.0.2.7", 60.0) == pytest.approx(890.0)
    assert throttle.check("someone-else", "192.0.2.8", 60.0) is None
    assert throttle.check("someone-else", "192.0.2.7", 950.0) is None


def test_ipv6_addresses_are_counted_per_64():
    throttle = LoginThrottle(max_per_name=100, max_per_address=2, window_s=60)
    throttle.failed("a", "2001:db8::1", 0.0)
    throttle.failed("b", "2001:db8::ffff:2", 0.0)
    assert throttle.check("c", "2001:db8::3", 1.0) is not None
    assert throttle.check("c", "2001:db8:0:1::3", 1.0) is None
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key("not an address") == "not an address"


def test_success_clears_the_name_but_not_the_address():
    throttle = LoginThrottle(max_per_name=3, max_per_address=4, window_s=900)
    fail(throttle, 3, "alice", "10.0.0.1", 0.0)
    assert throttle.check("alice", "10.0.0.2", 1.0) is not None
    throttle.succeeded("alice", "10.0.0.2")
    assert throttle.check("alice", "10.0.0.2", 1.0) is None
    throttle.failed("bob", "10.0.0.1", 1.0)
    assert throttle.check("carol", "10.0.0.1", 1.0) is not None


def test_throttle_memory_is_bounded_and_drops_the_oldest_keys():
    throttle = LoginThrottle(max_per_name=1, max_per_address=1000, window_s=900, max_keys=3)
    for i in range(10):
        throttle.failed(f"name{i}", f"10.0.0.{i}", float(i))
    assert throttle.tracked == (3, 3)
    assert throttle.check("name0", "10.9.9.9", 10.0) is None  # evicted
    assert throttle.check("name9", "10.9.9.9", 10.0) is not None
    # Expired keys are dropped as they are looked at.
    for i in range(7, 10):
        assert throttle.check(f"name{i}", "10.9.9.9", 2000.0) is None
    assert throttle.tracked[0] == 0


def test_throttle_and_login_together():
    record, throttle, address = enrolled(), LoginThrottle(max_per_name=2), "198.51.100.1"
    for _ in range(2):
        assert throttle.check("alice", address, NOW) is None
        refused(record, "guess guess guess", code(record, NOW))
        throttle.failed("alice", address, NOW)
    assert throttle.check("alice", address, NOW) is not None


# Admin token claims


def test_admin_token_claims_name_both_factors():
    claims = admin_token_claims("alice")
    assert claims == {"amr": ["pwd", "otp"]}
    assert has_second_factor(claims["amr"])
    with pytest.raises(EnrolmentRefused):
        admin_token_claims("not/a/name")


@pytest.mark.parametrize("amr", [None, [], ["pwd"], "otp", "pwd otp", {"otp": True}, [["otp"]], 1])
def test_amr_without_otp_is_not_a_second_factor(amr):
    assert not has_second_factor(amr)


def test_amr_claims_mint_an_admin_jwt_with_a_second_factor():
    secret = "s" * 32
    token = mint_jwt(secret, "alice", Role.ADMIN, 300, **admin_token_claims("alice"))
    identity = verify_jwt(token, secret)  # PyJWT checks exp against the real clock
    assert identity.role is Role.ADMIN
    assert identity.has_second_factor
    assert has_second_factor(list(identity.amr))
