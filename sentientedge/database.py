"""Flight history in PostgreSQL (``DATABASE_URL``): the only module that talks to the database.

Rules for this module:
- It runs through PgBouncer in transaction pooling mode: each statement or COPY stands alone
  (autocommit), no server-side prepared statements (``prepare_threshold=None``), no session
  state (no ``SET``, no temporary tables, no ``LISTEN``).
- At most ``DB_POOL_SIZE`` connections per router process.
- Every database failure surfaces as :class:`ArchiveUnavailable`. Routing never waits for the
  database: a shard hands rows to :class:`ArchiveWriter` (a list append) and goes on; one task
  writes whatever gathered while the previous COPY was in flight.
- What can be decided without a database (rows, sampling, the buffer's bound, COPY text,
  partitions, history queries) is :mod:`sentientedge.archive`, tested without one.
- Frames are stored as routed (MessagePack ``msg`` maps), sealed with ``ENCRYPTION_KEY`` when
  one is set, exactly as in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from sentientedge import archive, codec
from sentientedge.archive import ArchiveBuffer, ArchiveRow, HistoryRequest, TelemetryPolicy
from sentientedge.errors import ArchiveUnavailable, ProtocolError
from sentientedge.sealing import KeyRing, open_stored
from sentientedge.store import FRAME_CONTEXT

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # waiting for a pooled connection (PgBouncer queues us while it can)
STATEMENT_TIMEOUT_S = 30.0  # a COPY of a full batch, on a slow disk
PING_TIMEOUT_S = 2.0
BATCH_ROWS = 1_000  # rows in one COPY: its text is built on the loop in about 3 ms
MIN_COPY_INTERVAL_S = 0.05  # between the starts of two COPYs of a shard, unless one is full
RETRY_S = (0.5, 1.0, 2.0, 5.0)  # between attempts while the database is down
PARTITION_CHECK_MS = 3_600_000  # partitions for today and tomorrow, made at least hourly


def _now_ms() -> int:
    return int(time.time() * 1000)


class Database:
    """A pool of connections to the archive, and what the router does with it."""

    def __init__(
        self,
        url: str,
        pool_size: int,
        key_ring: KeyRing | None = None,
        table: str = archive.DEFAULT_TABLE,
        audit_table: str = archive.DEFAULT_AUDIT_TABLE,
    ) -> None:
        self.table = archive.check_table(table)
        self.audit_table = archive.check_table(audit_table)
        self.sealing = key_ring
        self._pool = AsyncConnectionPool(
            url,
            min_size=0,
            max_size=pool_size,
            open=False,
            kwargs={"autocommit": True, "prepare_threshold": None, "connect_timeout": 5},
            timeout=CONNECT_TIMEOUT_S,
            reconnect_timeout=0,  # never give up on a database that is down: retried per use
        )
        self._opened = False
        self._schema_ready = False
        self._partitions: set[Any] = set()  # days whose partition exists
        self._partitions_checked_ms = 0

    def pool_usage(self) -> float:
        """Share of ``DB_POOL_SIZE`` in use now (``database_connection_pool_usage``)."""
        if not self._opened:
            return 0.0
        stats = self._pool.get_stats()
        in_use = stats.get("pool_size", 0) - stats.get("pool_available", 0)
        return round(max(0, in_use) / self._pool.max_size, 3)

    async def _open(self) -> None:
        if not self._opened:
            await self._pool.open(wait=False)
            self._opened = True

    async def close(self) -> None:
        if self._opened:
            await self._pool.close()
            self._opened = False

    async def _run(self, work: Any, timeout: float = STATEMENT_TIMEOUT_S) -> Any:
        """``work(connection)`` with a pooled connection; any database failure is
        :class:`ArchiveUnavailable`, with the driver's reason (never the URL)."""
        await self._open()
        try:
            async with self._pool.connection(timeout=min(timeout, CONNECT_TIMEOUT_S)) as connection:
                try:
                    return await asyncio.wait_for(work(connection), timeout)
                except TimeoutError:
                    # A statement still in flight: this connection is no use to the next one.
                    await connection.close()
                    raise
        except (psycopg.Error, OSError, TimeoutError) as exc:
            if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.CheckViolation):
                self._schema_ready = False  # dropped under us, or no partition for a row
                self._partitions.clear()
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArchiveUnavailable(f"archive: {reason[:200]}") from None

    async def ping(self) -> bool:
        async def select_one(connection: psycopg.AsyncConnection[Any]) -> None:
            await connection.execute("SELECT 1")

        try:
            await self._run(select_one, PING_TIMEOUT_S)
            return True
        except ArchiveUnavailable:
            return False

    async def _prepare(self, connection: psycopg.AsyncConnection[Any], days: Iterable[Any]) -> None:
        """The tables, and a partition for every day about to be written (made once each)."""
        if not self._schema_ready:
            for statement in archive.schema_statements(self.table, self.audit_table):
                await connection.execute(statement)
            self._schema_ready = True
        for day in sorted(set(days) - self._partitions):
            # Another shard may make it between our IF NOT EXISTS and its own.
            with contextlib.suppress(psycopg.errors.DuplicateTable):
                await connection.execute(archive.partition_statement(self.table, day))
            self._partitions.add(day)

    async def write(self, rows: list[ArchiveRow], now_ms: int | None = None) -> None:
        """Rows in one COPY (their frames sealed first when ``ENCRYPTION_KEY`` is set)."""
        now_ms = _now_ms() if now_ms is None else now_ms
        if self.sealing is not None:
            rows = [row._replace(frame=self.sealing.seal(row.frame, FRAME_CONTEXT)) for row in rows]
        payload = archive.copy_rows(rows)
        days = {archive.day_of(row.ts) for row in rows}
        if now_ms - self._partitions_checked_ms >= PARTITION_CHECK_MS:
            days |= archive.days_needed(now_ms, ())
            self._partitions_checked_ms = now_ms

        async def copy(connection: psycopg.AsyncConnection[Any]) -> None:
            await self._prepare(connection, days)
            statement = archive.copy_statement(self.table)
            async with connection.cursor() as cursor, cursor.copy(statement) as stream:
                await stream.write(payload)

        await self._run(copy)

    async def history(self, request: HistoryRequest) -> list[dict[str, Any]]:
        """Archived messages, oldest first, each as the protocol's ``msg`` frame."""
        query, params = archive.history_query(self.table, request)

        async def select(connection: psycopg.AsyncConnection[Any]) -> list[Any]:
            await self._prepare(connection, ())
            async with connection.cursor() as cursor:
                await cursor.execute(query, params)
                return await cursor.fetchall()

        frames = []
        for row in await self._run(select):
            frame = codec.decode_frame(open_stored(self.sealing, bytes(row[-1]), FRAME_CONTEXT))
            frames.append(frame)
        return frames

    async def prune(self, retention_days: int, now_ms: int | None = None) -> list[str]:
        """Drop the daily partitions older than the retention; returns their names."""
        now_ms = _now_ms() if now_ms is None else now_ms
        listing, params = archive.list_partitions_query(self.table)

        async def drop(connection: psycopg.AsyncConnection[Any]) -> list[str]:
            names = [row[0] for row in await (await connection.execute(listing, params)).fetchall()]
            expired = archive.expired_partitions(self.table, names, now_ms, retention_days)
            for name in expired:
                await connection.execute(archive.drop_partition_statement(self.table, name))
            return expired

        dropped: list[str] = await self._run(drop)
        self._partitions = {
            d for d in self._partitions if archive.partition_name(self.table, d) not in dropped
        }
        return dropped

    async def audit(self, events: list[tuple[int, str, str]]) -> None:
        """Audit events (ts, event, JSON of its fields) into the audit table."""

        async def insert(connection: psycopg.AsyncConnection[Any]) -> None:
            await self._prepare(connection, ())
            async with connection.cursor() as cursor:
                await cursor.executemany(archive.audit_insert(self.audit_table), events)

        await self._run(insert)


class ArchiveWriter:
    """What one shard routes, on its way to the archive.

    The shard calls :meth:`routed` (QoS 0, sampled per ``ARCHIVE_TELEMETRY``) and :meth:`stored`
    (QoS 1, after Redis took it: always archived) from its event loop; both only append. One
    task writes: a COPY of what is waiting, then again with what gathered meanwhile. While the
    database is down, rows wait (QoS 0 ones dropped and counted past ``ARCHIVE_BUFFER_MAX``,
    QoS 1 ones kept) and writing is tried again after a pause.
    """

    def __init__(self, database: Database, policy: TelemetryPolicy, buffer_max: int) -> None:
        self.database = database
        self.policy = policy
        self.buffer = ArchiveBuffer(buffer_max)
        self.written = 0
        self.failures = 0
        self.refused = 0
        self.healthy = True
        self.last_error = ""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._copy_started = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.database.close()

    def routed(self, topic: str, frame: bytes, publisher: str, ts: int) -> None:
        if self.policy.keep(topic, ts):
            self.buffer.add(ArchiveRow(ts, topic, publisher, 0, None, frame))
            self._wake.set()

    def stored(self, topic: str, frame: bytes, publisher: str, offset: str) -> None:
        # The frame's own receive time (what /history filters and sorts by, as for QoS 0); the
        # stream offset's (Redis's) if a frame ever lacked one: this runs inside the shard's
        # store loop, which must not fail on it.
        try:
            ts = int(codec.decode_frame(frame)["ts"])
        except (ProtocolError, KeyError, TypeError, ValueError):
            ts = int(offset.split("-")[0])
        self.buffer.add(ArchiveRow(ts, topic, publisher, 1, offset, frame))
        self._wake.set()

    async def _run(self) -> None:
        attempt = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while len(self.buffer):
                await self._gather()
                rows = self.buffer.take(BATCH_ROWS)
                self._copy_started = time.monotonic()
                try:
                    await self.database.write(rows)
                except ArchiveUnavailable as exc:
                    self.buffer.put_back(rows)
                    self.failures += 1
                    if self.healthy or attempt == 0:
                        log.warning("archive writes failing, rows kept: %s", exc)
                    self.healthy, self.last_error = False, str(exc)
                    await asyncio.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
                    attempt += 1
                    continue
                except (ValueError, TypeError) as exc:  # a row COPY cannot carry: never will
                    self.refused += len(rows)
                    log.error("archive: %d rows refused and dropped: %s", len(rows), exc)
                    continue
                except Exception:  # a bug here must not end archiving for the shard's life
                    log.exception("archive write failed unexpectedly; rows kept, retrying")
                    self.buffer.put_back(rows)
                    self.failures += 1
                    await asyncio.sleep(RETRY_S[-1])
                    continue
                if not self.healthy:
                    log.info("archive writes resumed after %d failed attempts", attempt)
                self.healthy, attempt = True, 0
                self.written += len(rows)
            self.policy.forget_older_than(_now_ms() - 60_000)

    async def _gather(self) -> None:
        """Let rows gather until a COPY's worth waits or ``MIN_COPY_INTERVAL_S`` passed since
        the last one began. **Decision:** the one place here that batches by time: a COPY costs
        the shard two round trips of Python protocol work (~0.2 ms) whatever it carries, and a
        database that answers in a millisecond would otherwise get a COPY of ten rows a
        millisecond (a fifth of a core at 10,000 rows/s). History can wait 50 ms; routing never
        waits for it."""
        wait = self._copy_started + MIN_COPY_INTERVAL_S - time.monotonic()
        if wait > 0 and len(self.buffer) < BATCH_ROWS:
            await asyncio.sleep(wait)

    def stats(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "written": self.written,
            "buffered": len(self.buffer),
            "buffered_qos1": self.buffer.durable,
            "dropped": self.buffer.dropped,
            "refused": self.refused,
            "failures": self.failures,
            "pool_usage": self.database.pool_usage(),
        }


class AuditShipper:
    """A process's audit events on their way to the audit table, in batches: the file and the
    log have them at once; the table gets them when the database answers (up to a bound)."""

    MAX_WAITING = 10_000

    def __init__(self, database: Database) -> None:
        self.database = database
        self.waiting: list[tuple[int, str, str]] = []
        self.dropped = 0
        self._wake = asyncio.Event()

    def add(self, document: dict[str, Any]) -> None:
        if len(self.waiting) >= self.MAX_WAITING:
            self.dropped += 1
            return
        fields = {k: v for k, v in document.items() if k not in ("ts", "event")}
        self.waiting.append(archive.audit_row(str(document["event"]), fields, _now_ms()))
        self._wake.set()

    async def run(self) -> None:
        attempt = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.waiting:
                events, self.waiting = self.waiting, []
                try:
                    await self.database.audit(events)
                    attempt = 0
                except ArchiveUnavailable:
                    self.waiting[:0] = events
                    await asyncio.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
                    attempt += 1


def record_audit(url: str, document: dict[str, Any]) -> None:
    """One audit event from a command (the CLI), written at once; a database that does not
    answer within a few seconds costs the command a warning, not its work."""
    fields = {k: v for k, v in document.items() if k not in ("ts", "event")}
    row = archive.audit_row(str(document["event"]), fields, _now_ms())
    try:
        with psycopg.connect(url, autocommit=True, prepare_threshold=None, connect_timeout=3) as db:
            for statement in archive.schema_statements():
                db.execute(statement)
            db.execute(archive.audit_insert(), row)
    except psycopg.Error as exc:
        log.warning("audit event not written to the archive: %s", str(exc).splitlines()[0])
