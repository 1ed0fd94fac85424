"""The message archive, without a database: what to keep, what to hold, what to send (PostgreSQL).

Every decision that needs no connection lives here, so it is tested in milliseconds; the I/O
part (connection pool, ``COPY``, flush loop, partition upkeep) runs it and moves bytes.

Rules for this module:
- Pure: no I/O, no database driver. Time comes in as an argument (``ts_ms``, ``now_ms``:
  milliseconds since the Unix epoch, UTC), never from a clock.
- SQL is plain text with psycopg's ``%s`` placeholders and no session state: it runs through
  PgBouncer in transaction pooling mode. Values always travel as parameters; the only names
  spliced into SQL are table names from configuration, checked by :func:`check_table` and quoted.
- One partitioned table (``se_messages`` by default), ``PARTITION BY RANGE (ts)``, one partition
  per UTC day named ``{table}_{YYYYMMDD}`` for ``[midnight, next midnight)`` in ms; a plain audit
  table (``se_audit``) beside it.
- The buffer keeps QoS 1 rows until they are written; QoS 0 rows make room when it is full,
  oldest first, and every drop is counted.
- Telemetry (``drone/{id}/telemetry``) may be archived all, none or sampled per topic
  (``ARCHIVE_TELEMETRY``); every other topic is archived whole.
- History reads match topics as the router does (:mod:`sentientedge.topics`): the SQL regex of a
  filter is :func:`filter_regex`, which the tests check against :func:`topics.matches`.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from collections import deque
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any, NamedTuple

from sentientedge.errors import BadHistoryRequest, BadTopic, ConfigError
from sentientedge.topics import MULTI, SINGLE, validate_filter

DEFAULT_TABLE = "se_messages"
DEFAULT_AUDIT_TABLE = "se_audit"
DAY_MS = 86_400_000
_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()

# Short enough that "{table}_{YYYYMMDD}" and "{table}_topic_ts" stay within PostgreSQL's 63-byte
# identifiers (longer ones are silently truncated, and then two names could meet).
_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,40}\Z")


def check_table(table: str) -> str:
    """Return ``table`` if it is a safe table name, else raise ValueError."""
    if not isinstance(table, str) or not _TABLE_NAME.match(table):
        raise ValueError(f"bad table name {table!r}: expected [a-z_][a-z0-9_]{{0,40}}")
    return table


def _quoted(name: str) -> str:
    # Checked names need no quotes, but quoting keeps a reserved word ("order") a plain name.
    return f'"{name}"'


# --- Telemetry sampling (ARCHIVE_TELEMETRY) ---------------------------------------------------

MAX_TELEMETRY_HZ = 1000.0
_RATE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:hz)?\Z", re.IGNORECASE)


def is_telemetry(topic: str) -> bool:
    """Whether ``topic`` is a drone's telemetry: ``drone/{id}/telemetry``, exactly three levels."""
    # Three string tests, no regex: this runs once per routed message.
    return topic.startswith("drone/") and topic.endswith("/telemetry") and topic.count("/") == 2


class TelemetryPolicy:
    """Which telemetry messages are archived: all, none, or at most N a second per topic.

    Sampled per topic: a message is kept when ``1000 / N`` ms or more passed since the last kept
    one of its topic. The memory is one entry per telemetry topic seen; the owner prunes it with
    :meth:`forget_older_than` now and then.
    """

    __slots__ = ("_interval_ms", "_last", "hz", "mode")

    ALL = "all"
    NONE = "none"
    RATE = "rate"

    def __init__(self, mode: str = ALL, hz: float | None = None) -> None:
        if mode == self.RATE:
            if hz is None or not 0 < hz <= MAX_TELEMETRY_HZ:
                raise ValueError(f"rate must be above 0 and at most {MAX_TELEMETRY_HZ:g} hz")
        elif mode in (self.ALL, self.NONE):
            hz = None
        else:
            raise ValueError(f"unknown telemetry mode {mode!r}")
        self.mode = mode
        self.hz = hz
        self._interval_ms = 1000.0 / hz if hz else 0.0
        self._last: dict[str, int] = {}

    @classmethod
    def parse(cls, text: str) -> TelemetryPolicy:
        """Parse ``ARCHIVE_TELEMETRY``: ``all`` (the default when empty), ``none``, or a rate
        such as ``10hz``, ``10Hz``, ``10`` or ``0.5hz``."""
        value = (text or "").strip().lower()
        if value in ("", cls.ALL):
            return cls(cls.ALL)
        if value == cls.NONE:
            return cls(cls.NONE)
        found = _RATE.match(value)
        if not found:
            raise ConfigError(
                "ARCHIVE_TELEMETRY", text, "expected all, none or a rate such as 10hz"
            )
        hz = float(found.group(1))
        if hz <= 0:
            raise ConfigError("ARCHIVE_TELEMETRY", text, "rate must be above 0")
        if hz > MAX_TELEMETRY_HZ:
            raise ConfigError(
                "ARCHIVE_TELEMETRY", text, f"rate must be at most {MAX_TELEMETRY_HZ:g}hz"
            )
        return cls(cls.RATE, hz)

    def __repr__(self) -> str:
        return f"TelemetryPolicy({self.mode if self.hz is None else f'{self.hz:g}hz'})"

    def keep(self, topic: str, ts_ms: int) -> bool:
        """Whether to archive the message of ``topic`` received at ``ts_ms``."""
        mode = self.mode
        if mode == "all" or not is_telemetry(topic):
            return True
        if mode == "none":
            return False
        last = self._last.get(topic)
        # A clock that went back by an interval or more (a restart, another ingress's clock)
        # counts as time passed: otherwise the topic would go unarchived until it caught up.
        if last is None or abs(ts_ms - last) >= self._interval_ms:
            self._last[topic] = ts_ms
            return True
        return False

    def forget_older_than(self, ts_ms: int) -> int:
        """Forget the topics whose last kept message is older than ``ts_ms``; return how many.

        A forgotten topic's next message is kept, as its first one was: call it with a time at
        least one interval ago and nothing is archived more often than the rate.
        """
        stale = [topic for topic, last in self._last.items() if last < ts_ms]
        for topic in stale:
            del self._last[topic]
        return len(stale)

    @property
    def tracked(self) -> int:
        """How many topics it remembers."""
        return len(self._last)


# --- Rows and the buffer ---------------------------------------------------------------------


class ArchiveRow(NamedTuple):
    """One message to archive, in the table's column order."""

    ts: int  # server receive time, ms since the Unix epoch (the msg frame's ``ts``)
    topic: str
    publisher: str  # the msg frame's ``from``
    qos: int
    stream_offset: str | None  # QoS 1: the offset in the topic's durable stream; else None
    frame: bytes  # the stored msg frame (MessagePack, maybe sealed): opaque here


class ArchiveBuffer:
    """The rows waiting for the database, bounded for QoS 0 only.

    QoS 1 rows are never dropped here: they wait until they are written, however long the
    database is away (they are in their durable stream too, but the archive must not have holes
    the router promised not to have). QoS 0 rows are dropped once the buffer holds ``max_rows``
    rows: the oldest QoS 0 rows make room, and when there are none the new QoS 0 row is dropped.
    A QoS 1 row arriving at a full buffer also pushes out the oldest QoS 0 row, if any.
    """

    __slots__ = ("_durable", "_lossy", "dropped", "max_rows")

    def __init__(self, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.max_rows = max_rows
        self._durable: deque[ArchiveRow] = deque()
        self._lossy: deque[ArchiveRow] = deque()
        self.dropped = 0  # QoS 0 rows dropped since creation

    def __len__(self) -> int:
        return len(self._durable) + len(self._lossy)

    @property
    def durable(self) -> int:
        """QoS 1 rows held."""
        return len(self._durable)

    @property
    def lossy(self) -> int:
        """QoS 0 rows held."""
        return len(self._lossy)

    def add(self, row: ArchiveRow) -> None:
        lossy = self._lossy
        if row.qos >= 1:
            self._durable.append(row)
            # Room for it, if a QoS 0 row can give it; each row leaves at most once: O(1)
            # amortized.
            self._trim(self.max_rows)
            return
        if len(self._durable) + len(lossy) >= self.max_rows:
            self._trim(self.max_rows - 1)
            if len(self._durable) + len(lossy) >= self.max_rows:
                self.dropped += 1  # all QoS 1: the new row is the one to go
                return
        lossy.append(row)

    def take(self, limit: int) -> list[ArchiveRow]:
        """Up to ``limit`` rows for one write: QoS 1 rows first, then QoS 0, each oldest first."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        rows: list[ArchiveRow] = []
        for source in (self._durable, self._lossy):
            count = min(limit - len(rows), len(source))
            rows.extend(source.popleft() for _ in range(count))
        return rows

    def put_back(self, rows: Iterable[ArchiveRow]) -> None:
        """Return the rows of a failed write, in front of the rest, in their order.

        Its QoS 0 rows are the oldest held, so they are the first to go if the buffer filled up
        meanwhile.
        """
        durable: list[ArchiveRow] = []
        lossy: list[ArchiveRow] = []
        for row in rows:
            (durable if row.qos >= 1 else lossy).append(row)
        self._durable.extendleft(reversed(durable))
        self._lossy.extendleft(reversed(lossy))
        self._trim(self.max_rows)

    def _trim(self, size: int) -> None:
        """Drop the oldest QoS 0 rows until at most ``size`` rows are held or none is left."""
        lossy = self._lossy
        excess = min(len(self._durable) + len(lossy) - size, len(lossy))
        for _ in range(excess):
            lossy.popleft()
        if excess > 0:
            self.dropped += excess


# --- COPY payload (PostgreSQL docs, "COPY", "Text Format"; "Binary Data Types", hex format) ----

COPY_COLUMNS = ("ts", "topic", "publisher", "qos", "stream_offset", "frame")


def copy_statement(table: str = DEFAULT_TABLE) -> str:
    """The statement that takes :func:`copy_rows`' payload (text format, the default)."""
    return f"COPY {_quoted(check_table(table))} ({', '.join(COPY_COLUMNS)}) FROM STDIN"


# In text format a backslash, a newline, a carriage return and the delimiter (tab) must be
# escaped. NUL cannot be in a PostgreSQL text value at all: it becomes U+FFFD rather than fail
# the whole batch again and again.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\ufffd"})


def _copy_text(value: str) -> str:
    # Tab, newline, CR and NUL are not printable: one C call clears the usual value.
    if value.isprintable() and "\\" not in value:
        return value
    return value.translate(_COPY_ESCAPES)


def copy_rows(rows: Iterable[ArchiveRow]) -> bytes:
    """The ``COPY ... FROM STDIN`` payload of ``rows``: text format, UTF-8, one line a row.

    ``frame`` goes as bytea's hex format, ``\\x`` and lowercase hex, its backslash doubled
    as the text format wants: the field reads ``\\\\x0a0b``. A missing offset is ``\\N``.
    """
    lines: list[str] = []
    append = lines.append
    for ts, topic, publisher, qos, offset, frame in rows:
        offset_field = "\\N" if offset is None else _copy_text(offset)
        # ":d" refuses a float or a str where the column wants an integer.
        append(
            f"{ts:d}\t{_copy_text(topic)}\t{_copy_text(publisher)}\t{qos:d}\t{offset_field}"
            f"\t\\\\x{frame.hex()}\n"
        )
    # A lone surrogate (from a JSON "\ud800") cannot be UTF-8: replaced, not a failed batch.
    return "".join(lines).encode("utf-8", "replace")


# --- Partitions and schema -------------------------------------------------------------------


def day_of(ts_ms: int) -> datetime.date:
    """The UTC day of ``ts_ms``."""
    # Integer arithmetic: a float timestamp could land a row a millisecond before midnight on
    # the next day.
    return datetime.date.fromordinal(_EPOCH_ORDINAL + ts_ms // DAY_MS)


def partition_bounds(day: datetime.date) -> tuple[int, int]:
    """``(from, to)`` in ms of ``day``'s partition: from its midnight (included) to the next."""
    low = (day.toordinal() - _EPOCH_ORDINAL) * DAY_MS
    return low, low + DAY_MS


def partition_name(table: str, day: datetime.date) -> str:
    return f"{check_table(table)}_{day:%Y%m%d}"


def schema_statements(
    table: str = DEFAULT_TABLE, audit_table: str = DEFAULT_AUDIT_TABLE
) -> list[str]:
    """The statements that create the tables and indexes, each safe to run again."""
    table, audit_table = check_table(table), check_table(audit_table)
    if table == audit_table:
        raise ValueError("the archive and audit tables need different names")
    return [
        # COLLATE "C": a btree index serves "topic LIKE 'prefix%'" only under the C collation
        # (or text_pattern_ops); topics are ASCII, so byte order is the natural one anyway.
        f"CREATE TABLE IF NOT EXISTS {_quoted(table)} ("
        'ts bigint NOT NULL, topic text COLLATE "C" NOT NULL, publisher text NOT NULL, '
        "qos smallint NOT NULL, stream_offset text, frame bytea NOT NULL"
        ") PARTITION BY RANGE (ts)",
        # On the parent: every partition gets its own, now and when created later.
        f"CREATE INDEX IF NOT EXISTS {_quoted(table + '_topic_ts')} "
        f"ON {_quoted(table)} (topic, ts)",
        f"CREATE TABLE IF NOT EXISTS {_quoted(audit_table)} ("
        "ts bigint NOT NULL, event text NOT NULL, detail jsonb NOT NULL)",
        f"CREATE INDEX IF NOT EXISTS {_quoted(audit_table + '_ts')} ON {_quoted(audit_table)} (ts)",
    ]


def partition_statement(table: str, day: datetime.date) -> str:
    """The statement that creates ``day``'s partition of ``table`` (safe to run again)."""
    low, high = partition_bounds(day)
    return (
        f"CREATE TABLE IF NOT EXISTS {_quoted(partition_name(table, day))} "
        f"PARTITION OF {_quoted(table)} FOR VALUES FROM ({low}) TO ({high})"
    )


def drop_partition_statement(table: str, name: str) -> str:
    """The statement that drops the partition ``name`` of ``table``; ValueError if ``name`` is
    not one (so only what :func:`expired_partitions` names can be dropped)."""
    if _partition_day(check_table(table), name) is None:
        raise ValueError(f"{name!r} is not a partition name of {table!r}")
    return f"DROP TABLE IF EXISTS {_quoted(name)}"


def days_needed(now_ms: int, rows_days: Iterable[datetime.date]) -> set[datetime.date]:
    """The days whose partitions must exist: today and tomorrow (UTC), and those of the rows
    about to be written (a row received just before midnight, written just after)."""
    today = day_of(now_ms)
    return {today, today + datetime.timedelta(days=1), *rows_days}


def _partition_day(table: str, name: str) -> datetime.date | None:
    """The day of the partition ``name`` of ``table``, or None if it is not named like one."""
    prefix = table + "_"
    if not name.startswith(prefix):
        return None
    digits = name[len(prefix) :]
    if len(digits) != 8 or not (digits.isascii() and digits.isdigit()):
        return None
    try:
        return datetime.datetime.strptime(digits, "%Y%m%d").date()
    except ValueError:
        return None


def expired_partitions(
    table: str, names: Iterable[str], now_ms: int, retention_days: int
) -> list[str]:
    """Of the partitions ``names``, those of ``table`` whose whole day ended ``retention_days``
    days or more before ``now_ms``, oldest first. ``retention_days`` <= 0 keeps everything."""
    check_table(table)
    if retention_days <= 0:
        return []
    horizon = now_ms - retention_days * DAY_MS
    expired = []
    for name in names:
        day = _partition_day(table, name)
        if day is not None and partition_bounds(day)[1] <= horizon:
            expired.append((day, name))
    return [name for _, name in sorted(expired)]


def list_partitions_query(table: str = DEFAULT_TABLE) -> tuple[str, tuple[str]]:
    """A query of the names of ``table``'s partitions, one row each, and its parameters."""
    # to_regclass: no rows, not an error, before the table exists.
    return (
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = to_regclass(%s) ORDER BY c.relname",
        (_quoted(check_table(table)),),
    )


# --- History reads (PROTOCOL.md, "GET /history") ----------------------------------------------

HISTORY_WINDOW_MS = 3_600_000  # "from" when not given: an hour before "to"
HISTORY_LIMIT = 1_000
MAX_HISTORY_LIMIT = 10_000
MAX_TS_MS = 2**63 - 1  # bigint
_UNSIGNED = re.compile(r"[0-9]{1,19}\Z")


class HistoryRequest(NamedTuple):
    topic_filter: str
    from_ms: int  # both ends included
    to_ms: int
    limit: int


def parse_history_request(params: Mapping[str, str], now_ms: int) -> HistoryRequest:
    """Check the query of ``GET /history``; raise :class:`BadHistoryRequest` saying what is wrong.

    The caller still checks the subscribe permission on ``topic_filter``.
    """
    topic_filter = params.get("topic")
    if not topic_filter:
        raise BadHistoryRequest("topic is required")
    try:
        validate_filter(topic_filter)
    except BadTopic as exc:
        raise BadHistoryRequest(f"bad topic: {exc.message}") from None
    to_ms = _whole(params, "to", now_ms, 0, MAX_TS_MS)
    from_ms = _whole(params, "from", max(0, to_ms - HISTORY_WINDOW_MS), 0, MAX_TS_MS)
    if from_ms > to_ms:
        raise BadHistoryRequest("from must not be after to")
    limit = _whole(params, "limit", HISTORY_LIMIT, 1, MAX_HISTORY_LIMIT)
    return HistoryRequest(topic_filter, from_ms, to_ms, limit)


def _whole(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = params.get(name)
    if text is None or text == "":
        return default
    # Not int(): it takes " 7", "+7", "7_000" and other digits than 0-9.
    if not isinstance(text, str) or not _UNSIGNED.match(text) or not low <= int(text) <= high:
        what = "a non-negative integer (ms)" if high == MAX_TS_MS else f"an integer {low}..{high}"
        raise BadHistoryRequest(f"{name} must be {what}")
    return int(text)


# The regex metacharacters of POSIX EREs (PostgreSQL's "~") and Python's re alike: escaped with a
# backslash, which both read as "this character". Topic grammar allows only "." and a leading
# "$" of them; the rest is for safety.
_REGEX_ESCAPES = str.maketrans({c: "\\" + c for c in "\\^$.|?*+()[]{}"})
_LIKE_ESCAPES = str.maketrans({"\\": "\\\\", "%": "\\%", "_": "\\_"})


@lru_cache(maxsize=1024)
def filter_regex(topic_filter: str) -> str:
    """An anchored regex matching the topics ``topic_filter`` matches (sentientedge.topics).

    Only ``^ $ [^/]+ [^/$] (/.*)? .*`` and escaped characters: the same meaning in PostgreSQL's
    regexes and Python's ``re``. Raises :class:`BadTopic` for a bad filter.
    """
    levels = validate_filter(topic_filter)
    parts: list[str] = []
    for index, level in enumerate(levels):
        if level == MULTI:
            # MQTT 4.7.1.2: "a/#" matches "a" too, so the "/" before "#" is optional with it.
            if index == 0:
                # MQTT 4.7.2: a filter starting with a wildcard matches no "$" topic.
                return "^[^$].*$"
            return "^" + "/".join(parts) + "(/.*)?$"
        if level == SINGLE:
            parts.append("[^/$][^/]*" if index == 0 else "[^/]+")
        else:
            parts.append(level.translate(_REGEX_ESCAPES))
    return "^" + "/".join(parts) + "$"


def filter_like_prefix(topic_filter: str) -> str:
    """The LIKE pattern (escape ``\\``) of the literal levels before the first wildcard: a
    necessary condition for the regex that an index on ``topic`` can serve. ``""`` if none."""
    levels = validate_filter(topic_filter)
    literal: list[str] = []
    for level in levels:
        if level == SINGLE:
            literal.append("")  # "a/+" needs "a/" and more
            break
        if level == MULTI:
            break  # "a/#" matches "a" itself: no "/" after it
        literal.append(level)
    else:
        return ""  # no wildcard: compared with "=" instead
    prefix = "/".join(literal)
    return prefix.translate(_LIKE_ESCAPES) + "%" if prefix else ""


HISTORY_COLUMNS = COPY_COLUMNS


def history_query(table: str, request: HistoryRequest) -> tuple[str, tuple[Any, ...]]:
    """The SELECT of a history read and its parameters; rows come in :data:`HISTORY_COLUMNS`."""
    topic_filter = request.topic_filter
    params: list[Any] = [request.from_ms, request.to_ms]
    if SINGLE not in topic_filter and MULTI not in topic_filter:
        condition = "topic = %s"
        params.append(topic_filter)
    else:
        condition = "topic ~ %s"
        like = filter_like_prefix(topic_filter)
        if like:
            # Standard strings (the default since PostgreSQL 9.1): '\' is one backslash.
            condition = "topic LIKE %s ESCAPE '\\' AND " + condition
            params.append(like)
        params.append(filter_regex(topic_filter))
    params.append(request.limit)
    query = (
        f"SELECT {', '.join(HISTORY_COLUMNS)} FROM {_quoted(check_table(table))} "
        f"WHERE ts BETWEEN %s AND %s AND {condition} ORDER BY ts, stream_offset LIMIT %s"
    )
    return query, tuple(params)


# --- Audit rows ------------------------------------------------------------------------------

# As sentientedge.audit.SECRET_FIELDS (a test keeps them equal): the audit table, like the audit
# log, never holds a secret, whatever the caller passed.
SECRET_FIELDS = frozenset(
    {"token", "password", "otp", "secret", "api_key", "key", "authorization", "totp_secret"}
)


def audit_insert(audit_table: str = DEFAULT_AUDIT_TABLE) -> str:
    """The INSERT that takes :func:`audit_row`'s values."""
    return (
        f"INSERT INTO {_quoted(check_table(audit_table))} (ts, event, detail) "
        "VALUES (%s, %s, %s::jsonb)"
    )


def audit_row(event: str, fields: Mapping[str, Any], ts_ms: int) -> tuple[int, str, str]:
    """``(ts, event, detail)`` of one audit event; ``detail`` is the JSON text of ``fields``,
    without secrets or None values (as the audit log writes them)."""
    detail = {
        _no_nul(str(name)): _no_nul(value)
        for name, value in fields.items()
        if value is not None and str(name).lower() not in SECRET_FIELDS
    }
    return ts_ms, _no_nul(event), json.dumps(detail, default=str, separators=(",", ":"))


def _no_nul(value: Any) -> Any:
    # What would fail the insert: jsonb refuses "\u0000" in a string (and text refuses NUL), and
    # NaN and infinities are not JSON.
    if isinstance(value, str):
        return value.replace("\0", "\ufffd")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {_no_nul(str(k)): _no_nul(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nul(v) for v in value]
    return value
