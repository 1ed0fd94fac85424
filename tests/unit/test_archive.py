"""The archive's pure part: telemetry sampling, the row buffer, the COPY payload, partitions,
history reads and audit rows. No database: the COPY text format and the SQL regexes are checked
against models written from the PostgreSQL docs and against sentientedge.topics."""

from __future__ import annotations

import datetime
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentientedge import audit
from sentientedge.archive import (
    COPY_COLUMNS,
    DAY_MS,
    SECRET_FIELDS,
    ArchiveBuffer,
    ArchiveRow,
    HistoryRequest,
    TelemetryPolicy,
    audit_insert,
    audit_row,
    check_table,
    copy_rows,
    copy_statement,
    day_of,
    days_needed,
    drop_partition_statement,
    expired_partitions,
    filter_like_prefix,
    filter_regex,
    history_query,
    is_telemetry,
    list_partitions_query,
    parse_history_request,
    partition_bounds,
    partition_name,
    partition_statement,
    schema_statements,
)
from sentientedge.errors import BadHistoryRequest, BadTopic, ConfigError
from sentientedge.topics import matches

FUZZ = settings(max_examples=300, deadline=None)
JAN_1_2024 = 1_704_067_200_000  # 2024-01-01T00:00:00Z in ms
NOW = JAN_1_2024 + 12 * 3_600_000  # noon


def row(ts: int = 0, qos: int = 0, topic: str = "a/b", **changes: object) -> ArchiveRow:
    fields: dict[str, object] = {
        "ts": ts,
        "topic": topic,
        "publisher": "drone-1",
        "qos": qos,
        "stream_offset": f"{ts}-0" if qos else None,
        "frame": b"\x81",
    }
    fields.update(changes)
    return ArchiveRow(**fields)  # type: ignore[arg-type]


# --- Telemetry policy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode", "hz"),
    [
        ("all", "all", None),
        ("", "all", None),
        ("ALL", "all", None),
        ("none", "none", None),
        (" None ", "none", None),
        ("10hz", "rate", 10.0),
        ("10Hz", "rate", 10.0),
        ("10", "rate", 10.0),
        ("0.5hz", "rate", 0.5),
        ("1000", "rate", 1000.0),
    ],
)
def test_telemetry_policy_parses(text, mode, hz):
    policy = TelemetryPolicy.parse(text)
    assert (policy.mode, policy.hz) == (mode, hz)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("some", "expected all, none or a rate such as 10hz"),
        ("10khz", "expected all, none or a rate such as 10hz"),
        ("-1hz", "expected all, none or a rate such as 10hz"),
        ("1e3", "expected all, none or a rate such as 10hz"),
        ("nan", "expected all, none or a rate such as 10hz"),
        ("inf", "expected all, none or a rate such as 10hz"),
        ("0", "rate must be above 0"),
        ("0.0hz", "rate must be above 0"),
        ("1001hz", "rate must be at most 1000hz"),
    ],
)
def test_bad_telemetry_settings_name_the_variable(text, reason):
    with pytest.raises(ConfigError) as caught:
        TelemetryPolicy.parse(text)
    assert caught.value.variable == "ARCHIVE_TELEMETRY"
    assert caught.value.value == text
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("drone/7/telemetry", True),
        ("drone/a.b_c/telemetry", True),
        ("drone/telemetry", False),
        ("drone/7/telemetry/x", False),
        ("drone/7/status", False),
        ("drones/7/telemetry", False),
        ("x/drone/7/telemetry", False),
        ("fleet/7/telemetry", False),
    ],
)
def test_is_telemetry(topic, expected):
    assert is_telemetry(topic) is expected


def test_sampling_at_10hz_keeps_one_message_per_100ms_per_topic():
    policy = TelemetryPolicy.parse("10hz")
    kept: dict[str, list[int]] = {"drone/1/telemetry": [], "drone/2/telemetry": [], "a/b": []}
    for index in range(50):
        ts = NOW + 20 * index
        for topic, times in kept.items():
            if policy.keep(topic, ts):
                times.append(ts - NOW)
    assert kept["drone/1/telemetry"] == list(range(0, 1000, 100))
    assert kept["drone/2/telemetry"] == list(range(0, 1000, 100))
    assert len(kept["a/b"]) == 50  # not telemetry: all of it


def test_sampling_below_one_hz():
    policy = TelemetryPolicy.parse("0.5hz")
    kept = [ts for ts in range(0, 10_000, 500) if policy.keep("drone/1/telemetry", ts)]
    assert kept == [0, 2000, 4000, 6000, 8000]


def test_all_and_none():
    every, nothing = TelemetryPolicy.parse("all"), TelemetryPolicy.parse("none")
    for ts in range(10):
        assert every.keep("drone/1/telemetry", ts)
        assert not nothing.keep("drone/1/telemetry", ts)
        assert nothing.keep("drone/1/status", ts)
    assert every.tracked == nothing.tracked == 0


def test_a_clock_gone_back_does_not_stop_the_archive():
    policy = TelemetryPolicy.parse("10hz")
    assert policy.keep("drone/1/telemetry", NOW)
    assert not policy.keep("drone/1/telemetry", NOW - 50)  # reordered a little: a sample
    assert policy.keep("drone/1/telemetry", NOW - 60_000)  # clock back a minute: starts again
    assert not policy.keep("drone/1/telemetry", NOW - 60_000 + 99)
    assert policy.keep("drone/1/telemetry", NOW - 60_000 + 100)


def test_forget_older_than_bounds_the_memory():
    policy = TelemetryPolicy.parse("10hz")
    for drone in range(100):
        policy.keep(f"drone/{drone}/telemetry", NOW + drone)
    assert policy.tracked == 100
    assert policy.forget_older_than(NOW + 60) == 60
    assert policy.tracked == 40
    assert policy.keep("drone/0/telemetry", NOW + 61)  # forgotten: kept as a first one
    assert not policy.keep("drone/99/telemetry", NOW + 150)  # remembered


def test_policy_constructor_checks_its_rate():
    with pytest.raises(ValueError):
        TelemetryPolicy("rate", 0)
    with pytest.raises(ValueError):
        TelemetryPolicy("sometimes")
    assert repr(TelemetryPolicy.parse("2.5hz")) == "TelemetryPolicy(2.5hz)"


# --- Buffer -----------------------------------------------------------------------------------


def test_buffer_drops_the_oldest_qos0_rows_first():
    buffer = ArchiveBuffer(max_rows=3)
    for ts in range(5):
        buffer.add(row(ts))
    assert (len(buffer), buffer.dropped) == (3, 2)
    assert [r.ts for r in buffer.take(10)] == [2, 3, 4]


def test_buffer_never_drops_qos1_rows():
    buffer = ArchiveBuffer(max_rows=3)
    buffer.add(row(0, qos=0))
    for ts in range(1, 6):
        buffer.add(row(ts, qos=1))
    buffer.add(row(6, qos=0))  # all QoS 1: the new row goes
    assert (buffer.durable, buffer.lossy, buffer.dropped) == (5, 0, 2)
    assert [r.ts for r in buffer.take(10)] == [1, 2, 3, 4, 5]


def test_a_qos1_row_pushes_out_the_oldest_qos0_row():
    buffer = ArchiveBuffer(max_rows=3)
    for ts in range(3):
        buffer.add(row(ts))
    buffer.add(row(3, qos=1))
    assert (buffer.durable, buffer.lossy, buffer.dropped) == (1, 2, 1)
    assert [r.ts for r in buffer.take(10)] == [3, 1, 2]


def test_take_gives_qos1_first_then_qos0_in_arrival_order():
    buffer = ArchiveBuffer(max_rows=100)
    for ts, qos in enumerate([0, 1, 0, 1, 0, 1]):
        buffer.add(row(ts, qos=qos))
    assert [r.ts for r in buffer.take(4)] == [1, 3, 5, 0]
    assert [r.ts for r in buffer.take(4)] == [2, 4]
    assert buffer.take(4) == []
    assert len(buffer) == 0


def test_put_back_keeps_the_order():
    buffer = ArchiveBuffer(max_rows=100)
    for ts, qos in enumerate([1, 0, 1, 0, 1, 0]):
        buffer.add(row(ts, qos=qos))
    batch = buffer.take(4)  # 0, 2, 4 (QoS 1) and 1
    buffer.add(row(6, qos=1))
    buffer.add(row(7, qos=0))
    buffer.put_back(batch)
    assert [r.ts for r in buffer.take(100)] == [0, 2, 4, 6, 1, 3, 5, 7]
    assert buffer.dropped == 0


def test_put_back_obeys_the_bound_for_qos0_rows():
    buffer = ArchiveBuffer(max_rows=4)
    for ts, qos in enumerate([1, 0, 0, 0]):
        buffer.add(row(ts, qos=qos))
    batch = buffer.take(3)  # 0 (QoS 1), 1, 2
    for ts in (4, 5, 6):
        buffer.add(row(ts, qos=0))
    buffer.put_back(batch)  # 7 rows for 4 places: the put-back QoS 0 rows are the oldest
    assert (buffer.durable, buffer.lossy, buffer.dropped) == (1, 3, 3)
    assert [r.ts for r in buffer.take(100)] == [0, 4, 5, 6]


def test_put_back_never_drops_qos1_rows():
    buffer = ArchiveBuffer(max_rows=2)
    for ts in range(4):
        buffer.add(row(ts, qos=1))
    batch = buffer.take(3)
    buffer.put_back(batch)
    assert [r.ts for r in buffer.take(100)] == [0, 1, 2, 3]
    assert buffer.dropped == 0


def test_buffer_arguments():
    with pytest.raises(ValueError):
        ArchiveBuffer(0)
    with pytest.raises(ValueError):
        ArchiveBuffer(1).take(0)


@FUZZ
@given(
    max_rows=st.integers(1, 6),
    steps=st.lists(st.sampled_from(["q0", "q1", "take", "fail"]), max_size=60),
)
def test_buffer_model(max_rows, steps):
    """QoS 1 rows all come out once and in order; QoS 0 rows come out in order or are counted;
    QoS 0 rows are held only while the buffer is within its bound."""
    buffer = ArchiveBuffer(max_rows)
    written: list[ArchiveRow] = []
    added: list[ArchiveRow] = []
    for ts, step in enumerate(steps):
        if step in ("q0", "q1"):
            new = row(ts, qos=int(step == "q1"))
            added.append(new)
            buffer.add(new)
        elif step == "take":
            written.extend(buffer.take(2))
        else:
            buffer.put_back(buffer.take(2))
        assert buffer.lossy == 0 or len(buffer) <= max_rows
    written.extend(buffer.take(len(added) + 1))
    durable = [r for r in added if r.qos]
    assert [r for r in written if r.qos] == durable
    assert len(written) + buffer.dropped == len(added)
    lossy_written = [r.ts for r in written if not r.qos]
    assert lossy_written == sorted(lossy_written)


# --- COPY payload -----------------------------------------------------------------------------


def parse_copy_text(payload: bytes) -> list[list[str | None]]:
    """COPY's text format read back, per the PostgreSQL docs ("COPY", "Text Format")."""
    escapes = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
    rows: list[list[str | None]] = []
    text = payload.decode("utf-8")
    assert text == "" or text.endswith("\n")
    for line in text.split("\n")[:-1]:
        fields: list[str | None] = []
        for raw in line.split("\t"):  # a literal tab always separates: data tabs are escaped
            if raw == "\\N":
                fields.append(None)
                continue
            out, index = [], 0
            while index < len(raw):
                char = raw[index]
                if char == "\\":
                    index += 1
                    out.append(escapes.get(raw[index], raw[index]))
                else:
                    assert char not in "\r\n"
                    out.append(char)
                index += 1
            fields.append("".join(out))
        rows.append(fields)
    return rows


def bytea_from_hex(field: str) -> bytes:
    """bytea's hex input format: ``\\x`` then pairs of hex digits."""
    assert field.startswith("\\x")
    return bytes.fromhex(field[2:])


def test_copy_row_exact_bytes():
    payload = copy_rows([ArchiveRow(1_700_000_000_123, "a/b", "drone-1", 1, "17-0", b"\n\x0b")])
    assert payload == b"1700000000123\ta/b\tdrone-1\t1\t17-0\t\\\\x0a0b\n"


def test_copy_null_offset_and_bytea_with_nul_and_backslash():
    payload = copy_rows([ArchiveRow(5, "a", "p", 0, None, b"\x00\x5c\xff")])
    assert payload == b"5\ta\tp\t0\t\\N\t\\\\x005cff\n"
    [[*_, offset, frame]] = parse_copy_text(payload)
    assert offset is None
    assert frame is not None and bytea_from_hex(frame) == b"\x00\\\xff"


def test_copy_escapes_text_fields():
    payload = copy_rows([ArchiveRow(5, "a", "x\ty\nz\\w\rv", 0, None, b"")])
    assert payload == b"5\ta\tx\\ty\\nz\\\\w\\rv\t0\t\\N\t\\\\x\n"
    assert parse_copy_text(payload)[0][2] == "x\ty\nz\\w\rv"


def test_copy_a_backslash_dot_value_is_not_the_end_marker():
    payload = copy_rows([ArchiveRow(5, "a", "\\.", 0, "\\.", b"")])
    assert b"\n\\.\n" not in b"\n" + payload
    assert parse_copy_text(payload)[0][2] == "\\."


def test_copy_never_fails_a_batch_on_text_postgresql_cannot_hold():
    payload = copy_rows([ArchiveRow(5, "a", "n\x00ul \ud800", 0, None, b"")])
    assert parse_copy_text(payload)[0][2] == "n\ufffdul ?"


def test_copy_refuses_a_non_integer_ts():
    with pytest.raises(ValueError):
        copy_rows([ArchiveRow(1.5, "a", "p", 0, None, b"")])  # type: ignore[arg-type]


def test_copy_of_several_rows_and_of_none():
    rows = [row(1, qos=1), row(2), row(3, qos=1)]
    assert len(parse_copy_text(copy_rows(rows))) == 3
    assert copy_rows([]) == b""


def test_copy_statement():
    assert copy_statement() == (
        'COPY "se_messages" (ts, topic, publisher, qos, stream_offset, frame) FROM STDIN'
    )
    assert ArchiveRow._fields == COPY_COLUMNS
    with pytest.raises(ValueError):
        copy_statement("x; DROP TABLE y")


# Text PostgreSQL can hold: no NUL, no lone surrogates.
pg_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))


@FUZZ
@given(
    rows=st.lists(
        st.builds(
            ArchiveRow,
            st.integers(0, 2**63 - 1),
            pg_text,
            pg_text,
            st.integers(0, 1),
            st.none() | pg_text,
            st.binary(max_size=40),
        ),
        max_size=5,
    )
)
def test_copy_round_trip(rows):
    parsed = parse_copy_text(copy_rows(rows))
    assert len(parsed) == len(rows)
    for fields, original in zip(parsed, rows, strict=True):
        ts, topic, publisher, qos, offset, frame = fields
        assert ts is not None and qos is not None and frame is not None
        assert (int(ts), topic, publisher, int(qos), offset) == tuple(original[:5])
        assert bytea_from_hex(frame) == original.frame
        assert frame[2:] == frame[2:].lower()


# --- Partitions and schema --------------------------------------------------------------------


def test_days_and_bounds_at_midnight():
    jan_1 = datetime.date(2024, 1, 1)
    assert day_of(JAN_1_2024) == jan_1
    assert day_of(JAN_1_2024 - 1) == datetime.date(2023, 12, 31)
    assert day_of(JAN_1_2024 + DAY_MS - 1) == jan_1
    assert day_of(0) == datetime.date(1970, 1, 1)
    assert partition_bounds(jan_1) == (JAN_1_2024, JAN_1_2024 + DAY_MS)
    low, high = partition_bounds(datetime.date(2024, 2, 29))
    assert (day_of(low), day_of(high - 1), day_of(high)) == (
        datetime.date(2024, 2, 29),
        datetime.date(2024, 2, 29),
        datetime.date(2024, 3, 1),
    )


@FUZZ
@given(st.integers(0, 4_102_444_800_000))  # to 2100
def test_every_ts_falls_in_its_days_partition(ts):
    low, high = partition_bounds(day_of(ts))
    assert low <= ts < high
    expected = datetime.datetime.fromtimestamp(ts // 1000, datetime.timezone.utc).date()
    assert day_of(ts) == expected


def test_partition_names_and_statement():
    day = datetime.date(2024, 3, 5)
    assert partition_name("se_messages", day) == "se_messages_20240305"
    low, high = partition_bounds(day)
    assert partition_statement("se_messages", day) == (
        'CREATE TABLE IF NOT EXISTS "se_messages_20240305" PARTITION OF "se_messages" '
        f"FOR VALUES FROM ({low}) TO ({high})"
    )


def test_schema_statements():
    create, index, audit_create, audit_index = schema_statements()
    assert create.startswith('CREATE TABLE IF NOT EXISTS "se_messages" (ts bigint NOT NULL, ')
    assert create.endswith(") PARTITION BY RANGE (ts)")
    for column in ("qos smallint NOT NULL", "stream_offset text,", "frame bytea NOT NULL"):
        assert column in create
    assert index == 'CREATE INDEX IF NOT EXISTS "se_messages_topic_ts" ON "se_messages" (topic, ts)'
    assert audit_create == (
        'CREATE TABLE IF NOT EXISTS "se_audit" '
        "(ts bigint NOT NULL, event text NOT NULL, detail jsonb NOT NULL)"
    )
    assert audit_index == 'CREATE INDEX IF NOT EXISTS "se_audit_ts" ON "se_audit" (ts)'
    assert '"m2"' in schema_statements("m2", "a2")[0]
    with pytest.raises(ValueError):
        schema_statements("same", "same")


def test_days_needed():
    jan_1, jan_2 = datetime.date(2024, 1, 1), datetime.date(2024, 1, 2)
    assert days_needed(NOW, []) == {jan_1, jan_2}
    late = datetime.date(2023, 12, 31)
    assert days_needed(JAN_1_2024, [late, jan_1]) == {late, jan_1, jan_2}
    assert days_needed(JAN_1_2024 - 1, []) == {late, jan_1}


def test_expired_partitions_at_the_retention_boundary():
    names = [
        "se_messages_20231230",
        "se_messages_20231231",
        "se_messages_20240101",
        "se_messages_20231229",
    ]
    # 2023-12-31 ends at JAN_1_2024: with 7 days kept it expires exactly 7 days later.
    at_bound = JAN_1_2024 + 7 * DAY_MS
    assert expired_partitions("se_messages", names, at_bound, 7) == [
        "se_messages_20231229",
        "se_messages_20231230",
        "se_messages_20231231",
    ]
    assert expired_partitions("se_messages", names, at_bound - 1, 7) == [
        "se_messages_20231229",
        "se_messages_20231230",
    ]


def test_expired_partitions_ignores_other_names_and_can_keep_forever():
    names = [
        "se_messages_20000101",
        "se_messages_x_20000101",
        "se_messages_2000010",
        "se_messages_200001011",
        "se_messages_20001350",
        "se_messages_\uff120000101",  # a fullwidth digit
        "other_20000101",
        "se_messages",
    ]
    assert expired_partitions("se_messages", names, NOW, 30) == ["se_messages_20000101"]
    assert expired_partitions("se_messages", names, NOW, 0) == []
    assert expired_partitions("se_messages", names, NOW, -1) == []


def test_drop_partition_statement_only_drops_partitions():
    assert drop_partition_statement("se_messages", "se_messages_20240101") == (
        'DROP TABLE IF EXISTS "se_messages_20240101"'
    )
    for name in ("se_messages", "se_audit", "se_messages_x"):
        with pytest.raises(ValueError):
            drop_partition_statement("se_messages", name)


def test_list_partitions_query():
    query, params = list_partitions_query("se_messages")
    assert "pg_inherits" in query and "pg_class" in query
    assert query.count("%s") == len(params) == 1
    assert params == ('"se_messages"',)


@pytest.mark.parametrize(
    "table", ["", "Messages", "1abc", "a-b", "a b", 'a"', "a;b", "x" * 42, "é", None]
)
def test_bad_table_names_are_refused_everywhere(table):
    day = datetime.date(2024, 1, 1)
    calls = [
        lambda: check_table(table),
        lambda: copy_statement(table),
        lambda: partition_name(table, day),
        lambda: partition_statement(table, day),
        lambda: schema_statements(table, "se_audit"),
        lambda: schema_statements("se_messages", table),
        lambda: expired_partitions(table, [], NOW, 7),
        lambda: list_partitions_query(table),
        lambda: history_query(table, HistoryRequest("a", 0, 1, 1)),
        lambda: audit_insert(table),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()


def test_good_table_names():
    for table in ("se_messages", "_x", "a1_2", "x" * 41):
        assert check_table(table) == table


# --- History reads ----------------------------------------------------------------------------


def test_history_defaults():
    assert parse_history_request({"topic": "drone/+/telemetry"}, NOW) == HistoryRequest(
        "drone/+/telemetry", NOW - 3_600_000, NOW, 1_000
    )
    assert parse_history_request({"topic": "a", "to": "100"}, NOW) == HistoryRequest(
        "a", 0, 100, 1_000
    )
    assert parse_history_request(
        {"topic": "a/#", "from": "5", "to": "5", "limit": "10000", "other": "x"}, NOW
    ) == HistoryRequest("a/#", 5, 5, 10_000)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "topic is required"),
        ({"topic": ""}, "topic is required"),
        ({"topic": "a//b"}, "bad topic: empty level"),
        ({"topic": "a/#/b"}, "bad topic: '#' must be the last level"),
        ({"topic": "a b"}, "bad topic: level 'a b' has characters outside [A-Za-z0-9_.:-]"),
        ({"topic": "a", "from": "x"}, "from must be a non-negative integer (ms)"),
        ({"topic": "a", "from": "-1"}, "from must be a non-negative integer (ms)"),
        ({"topic": "a", "from": "1.5"}, "from must be a non-negative integer (ms)"),
        ({"topic": "a", "from": " 1"}, "from must be a non-negative integer (ms)"),
        ({"topic": "a", "from": "1_000"}, "from must be a non-negative integer (ms)"),
        ({"topic": "a", "from": "\u0661"}, "from must be a non-negative integer (ms)"),
        ({"topic": "a", "to": "+5"}, "to must be a non-negative integer (ms)"),
        ({"topic": "a", "to": str(2**63)}, "to must be a non-negative integer (ms)"),
        ({"topic": "a", "from": "6", "to": "5"}, "from must not be after to"),
        ({"topic": "a", "from": str(NOW + 1)}, "from must not be after to"),
        ({"topic": "a", "limit": "0"}, "limit must be an integer 1..10000"),
        ({"topic": "a", "limit": "10001"}, "limit must be an integer 1..10000"),
        ({"topic": "a", "limit": "ten"}, "limit must be an integer 1..10000"),
    ],
)
def test_bad_history_requests(params, message):
    with pytest.raises(BadHistoryRequest) as caught:
        parse_history_request(params, NOW)
    assert str(caught.value) == message


def test_history_query_of_an_exact_topic():
    query, params = history_query("se_messages", HistoryRequest("drone/7/status", 10, 20, 50))
    assert query == (
        'SELECT ts, topic, publisher, qos, stream_offset, frame FROM "se_messages" '
        "WHERE ts BETWEEN %s AND %s AND topic = %s ORDER BY ts, stream_offset LIMIT %s"
    )
    assert params == (10, 20, "drone/7/status", 50)


def test_history_query_of_a_filter():
    query, params = history_query("se_messages", HistoryRequest("fleet_1/a.b/+/x", 10, 20, 50))
    assert "WHERE ts BETWEEN %s AND %s AND topic LIKE %s ESCAPE '\\' AND topic ~ %s " in query
    assert params == (10, 20, "fleet\\_1/a.b/%", r"^fleet_1/a\.b/[^/]+/x$", 50)
    assert query.count("%s") == len(params)


def test_history_query_of_a_leading_wildcard_has_no_like():
    query, params = history_query("se_messages", HistoryRequest("+/x", 10, 20, 50))
    assert "LIKE" not in query
    assert params == (10, 20, "^[^/$][^/]*/x$", 50)


@pytest.mark.parametrize(
    ("topic_filter", "regex", "like"),
    [
        ("#", "^[^$].*$", ""),
        ("+", "^[^/$][^/]*$", ""),
        ("a/#", "^a(/.*)?$", "a%"),
        ("a/+", "^a/[^/]+$", "a/%"),
        ("a/+/#", "^a/[^/]+(/.*)?$", "a/%"),
        ("$sys/#", "^\\$sys(/.*)?$", "$sys%"),
        ("a_b/c.d/#", "^a_b/c\\.d(/.*)?$", "a\\_b/c.d%"),
        ("a/b", "^a/b$", ""),
    ],
)
def test_filter_regex_and_like_prefix(topic_filter, regex, like):
    assert filter_regex(topic_filter) == regex
    assert filter_like_prefix(topic_filter) == like


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("#", "$sys/x", False),
        ("+/x", "$sys/x", False),
        ("$sys/#", "$sys/x", True),
        ("$sys/+", "$sys/x", True),
        ("a.b", "aXb", False),
        ("+", "a/b", False),
    ],
)
def test_filter_regex_examples(topic_filter, topic, expected):
    assert bool(re.search(filter_regex(topic_filter), topic)) is expected
    assert matches(topic_filter, topic) is expected


def test_filter_regex_refuses_bad_filters():
    with pytest.raises(BadTopic):
        filter_regex("a/#/b")


def like_matches(pattern: str, text: str) -> bool:
    """SQL LIKE with ESCAPE '\\', as a Python regex."""
    out, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            index += 1
            out.append(re.escape(pattern[index]))
        elif char == "%":
            out.append(".*")
        elif char == "_":
            out.append(".")
        else:
            out.append(re.escape(char))
        index += 1
    return re.fullmatch("".join(out), text, re.DOTALL) is not None


# Few names that meet often, with the characters that matter: "." and "_" (regex and LIKE
# metacharacters), "$" (server topics), and prefixes of one another.
names = st.sampled_from(["a", "b", "ab", "a.b", "aXb", "a_b", "a-b:c"])
first_names = names | st.sampled_from(["$sys", "$a", "$"])
topics = st.tuples(first_names, st.lists(names, max_size=4)).map(
    lambda parts: "/".join([parts[0], *parts[1]])
)
filter_levels = names | st.just("+")
filters = st.tuples(
    first_names | st.just("+"), st.lists(filter_levels, max_size=4), st.booleans()
).map(lambda parts: "/".join([parts[0], *parts[1], *(["#"] if parts[2] else [])])) | st.just("#")


@settings(max_examples=600, deadline=None)
@given(topic_filter=filters, topic=topics)
def test_sql_matching_agrees_with_the_router(topic_filter, topic):
    """What the history query selects is what the router would have delivered."""
    try:
        expected = matches(topic_filter, topic)
    except BadTopic:  # "$" alone is not a topic: nothing to compare
        return
    assert bool(re.search(filter_regex(topic_filter), topic)) is expected
    like = filter_like_prefix(topic_filter)
    if expected and like:
        assert like_matches(like, topic)  # the LIKE never drops a match


# --- Audit rows -------------------------------------------------------------------------------


def test_audit_row_and_insert():
    ts, event, detail = audit_row(
        "login",
        {"user": "ana", "outcome": "ok", "password": "x", "Token": "y", "ip": None, "n": 2},
        NOW,
    )
    assert (ts, event) == (NOW, "login")
    assert json.loads(detail) == {"user": "ana", "outcome": "ok", "n": 2}
    assert audit_insert() == (
        'INSERT INTO "se_audit" (ts, event, detail) VALUES (%s, %s, %s::jsonb)'
    )


def test_audit_detail_is_always_valid_jsonb():
    _, _, detail = audit_row(
        "x\x00", {"a\x00": "b\x00", "nested": {"c": ["\x00", float("nan")]}, "when": NOW}, NOW
    )
    assert "\\u0000" not in detail and "NaN" not in detail
    assert json.loads(detail) == {
        "a\ufffd": "b\ufffd",
        "nested": {"c": ["\ufffd", "nan"]},
        "when": NOW,
    }
    _, _, detail = audit_row("x", {"day": datetime.date(2024, 1, 1)}, NOW)
    assert json.loads(detail) == {"day": "2024-01-01"}


def test_audit_secrets_are_the_audit_logs():
    assert SECRET_FIELDS == audit.SECRET_FIELDS
