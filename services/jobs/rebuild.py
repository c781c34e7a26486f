"""``billing rebuild``: re-derive the read models from the cost topic and swap them in.

``billing_transactions`` and ``tenant_billing_summary`` are folds of ``billing.costs.v1``:
per ``request_id`` the highest revision wins (the first one in log order among equals, as
the projector keeps it), and the summary is the sum of the winning rows by tenant × UTC day
of ``occurred_at`` × model × ``coalesce(api_key_id, '')`` (``apply._summary_key``). The
rebuild computes that fold from offset 0 of every partition into fresh tables
(``*_rebuild``, ``LIKE … INCLUDING ALL``, filled by COPY and ``INSERT … SELECT``) and
replaces the live tables with them in one transaction.

Where it stops: at the offsets the projector has committed (``consumer_offsets``), never at
the broker's end offsets (Tansu under-reports them). It reads up to a snapshot of those
offsets without holding anything, then, in the swap transaction, locks the offset rows as
the projector does (so no projector batch commits meanwhile) and the three read-model
tables in EXCLUSIVE mode (writers wait, readers do not), reads the records the projector
committed since the snapshot, folds them in and swaps. The new tables are therefore the
fold of exactly the prefix of the log the live ones reflected. With no projector offsets
at all (a fresh database) the log is read until no record arrived for ``idle_seconds``,
and the offsets reached are stored with the tables, so a projector started later goes on
from there.

The swap: foreign keys that point at a live table (``billing_adjustments.request_id``) are
dropped, the live table is dropped (or kept as ``*_before_rebuild_<UTC time>``), the
rebuilt one takes its name, its indexes the live indexes' names (so constraint names and
the next rebuild stay the same), the live table's owner and grants, and the foreign keys
are added back (``NOT VALID`` + ``VALIDATE``) against it. Readers see the old tables or the
new ones, never a mix; the renames wait at most ``lock_timeout`` seconds for readers, after
which nothing has changed. The comparison with the live tables is made under the same
locks (a consistent pair), so the projector waits for it too; readers never do.

Equality (``--dry-run`` and the report): every column but ``projected_at`` and
``updated_at``, which say when a row was written; live summary rows whose every value is
zero (left behind when a revision moved a request to another key) count as absent.

Here: reading the log, the fold and the command; the comparison and the swap itself are in
``services.jobs.rebuild_tables``.

RebuildError        the rebuild was refused or could not finish; nothing was swapped
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from services.jobs.rebuild_tables import (
    LIVE,
    SUFFIX,
    SUMMARY_KEY_SQL,
    RebuildError,
    TableDiff,
    _compare,
    _swap,
)

# The CLI imports this module whenever it starts (``billing quote --batch`` must stay fast),
# so asyncpg, aiokafka, pydantic and the projector are imported by the functions using them.
if TYPE_CHECKING:
    import asyncpg
    from aiokafka import AIOKafkaConsumer, ConsumerRecord


FENCED = (*LIVE, "billing_adjustments")
"""Every table a projector batch writes: locked EXCLUSIVE (writers wait) during the swap."""
STAGING = "rebuild_events"
_KEY_EXPRS = ", ".join(SUMMARY_KEY_SQL.values())
_WINNER_ORDER = "request_id, revision DESC, log_partition, log_offset"
"""Highest revision; among equals the first in log order, the one the projector kept."""

_LOCK = 0x62696C6C_72626C64  # "billrbld": one rebuild at a time
_CHUNK = 5000
_WORK_MEM = "256MB"
_CATCH_UP_ROUNDS = 3
_CATCH_UP_UNLOCKED = 1000
"""Read without locks until fewer records than this remain, so the swap stays short."""
STALL_SECONDS = 15.0
"""Reading up to a committed offset that does not come for this long: the log is short."""

Progress = Callable[[int, int | None], None]
"""(records just read, estimated total or None)."""


@dataclass(slots=True)
class RebuildReport:
    dry_run: bool
    stop: str = "projector offsets"
    """Where reading stopped: "projector offsets", or "end of log" (no offsets yet)."""
    records_read: int = 0
    undecodable: int = 0
    caught_up: int = 0
    """Records read in the swap transaction (committed by the projector meanwhile)."""
    transactions: int = 0
    summary_rows: int = 0
    superseded: int = 0
    """Events below their request's winning revision."""
    duplicates: int = 0
    """Events at the winning revision after the first (redeliveries)."""
    offsets: dict[int, int] = field(default_factory=dict)
    diffs: list[TableDiff] = field(default_factory=list)
    swapped: bool = False
    kept: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def equal(self) -> bool:
        return all(d.equal for d in self.diffs)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "swapped": self.swapped,
            "equal": self.equal,
            "stop": self.stop,
            "records_read": self.records_read,
            "undecodable": self.undecodable,
            "caught_up_under_lock": self.caught_up,
            "transactions": self.transactions,
            "summary_rows": self.summary_rows,
            "revisions_superseded": self.superseded,
            "duplicates": self.duplicates,
            "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            "kept": self.kept,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


async def rebuild(
    bootstrap: str,
    connection: asyncpg.Connection,
    topic: str,
    *,
    dry_run: bool = False,
    keep_old: bool = False,
    idle_seconds: float = 3.0,
    lock_timeout: float = 10.0,
    progress: Progress | None = None,
    before_lock: Callable[[], Awaitable[None]] | None = None,
) -> RebuildReport:
    """Rebuild the read models from ``topic`` (see the module docstring); ``connection``
    needs ``init_connection``'s codecs. ``before_lock`` runs just before the swap
    transaction (tests use it to move the projector on meanwhile)."""
    from aiokafka import AIOKafkaConsumer

    from services.adapters.kafka import FETCH_MAX_WAIT_MS
    from services.projector.apply import SUMMARY_KEY, stored_offsets
    from services.projector.service import CONSUMER

    if tuple(SUMMARY_KEY_SQL) != SUMMARY_KEY:
        raise RebuildError(f"the summary key is now {SUMMARY_KEY}: update SUMMARY_KEY_SQL")
    report = RebuildReport(dry_run=dry_run)
    started = time.perf_counter()
    if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK):
        raise RebuildError("another rebuild is running on this database")
    # Sorts and hashes of whole tables (the fold, the EXCEPTs) stay in memory, 3× faster
    # than spilling at the default 4MB; this session only, one rebuild at a time.
    await connection.execute(f"SET work_mem = '{_WORK_MEM}'")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,  # positions are ours: nothing is committed anywhere
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # a vanished offset 0 shows as a later first record
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        max_partition_fetch_bytes=8 << 20,  # fewer round trips: the whole log is wanted
    )
    try:
        await _refuse_other_topics(connection, CONSUMER, topic)
        await consumer.start()
        partitions = await _partitions(consumer, topic)
        await _create_tables(connection)
        reader = _Reader(consumer, connection, topic, partitions, report, progress)
        snapshot = await stored_offsets(connection, CONSUMER, topic)
        if unknown := sorted(set(snapshot) - set(partitions)):
            raise RebuildError(f"projector offsets for partitions {unknown} {topic} does not have")
        if snapshot:
            for _ in range(_CATCH_UP_ROUNDS):
                await reader.read({p: snapshot.get(p, 0) for p in partitions}, phase=1)
                snapshot = await stored_offsets(connection, CONSUMER, topic)
                if reader.behind(snapshot) < _CATCH_UP_UNLOCKED:
                    break
        else:
            report.stop = "end of log"
            await reader.read(dict.fromkeys(partitions), phase=1, quiet=idle_seconds)
        await reader.flush()
        report.seconds["read"] = time.perf_counter() - started
        folding = time.perf_counter()
        await _fold_all(connection)
        report.seconds["fold"] = time.perf_counter() - folding
        if before_lock is not None:
            await before_lock()
        await _swap_transaction(connection, reader, report, keep_old, lock_timeout)
    finally:
        await consumer.stop()
        if not connection.is_closed():
            if not report.swapped:
                for table in LIVE:
                    await connection.execute(f"DROP TABLE IF EXISTS {table}{SUFFIX}")
            await connection.execute(f"DROP TABLE IF EXISTS {STAGING}")
            await connection.execute("SELECT pg_advisory_unlock($1)", _LOCK)
            await connection.execute("RESET work_mem")
    report.seconds["total"] = time.perf_counter() - started
    return report


async def _swap_transaction(
    connection: asyncpg.Connection,
    reader: _Reader,
    report: RebuildReport,
    keep_old: bool,
    lock_timeout: float,
) -> None:
    """Fence the projector, catch up to its offsets, compare, and (unless dry) swap."""
    import asyncpg

    from services.projector.apply import _lock_offsets, stored_offsets
    from services.projector.service import CONSUMER

    locked = time.perf_counter()
    topic, partitions = reader.topic, sorted(reader.next)
    transaction = connection.transaction()
    await transaction.start()
    swapped = False
    try:
        # The projector's order: offset rows (every partition, so a batch on any of them
        # waits), then the tables; EXCLUSIVE also fences a partition that appears meanwhile.
        await _lock_offsets(connection, CONSUMER, {(topic, p): 0 for p in partitions})
        await connection.execute(f"LOCK TABLE {', '.join(FENCED)} IN EXCLUSIVE MODE")
        committed = await stored_offsets(connection, CONSUMER, topic)
        before = report.records_read
        await reader.read({p: committed.get(p, 0) for p in partitions}, phase=2)
        await reader.flush()
        report.caught_up = report.records_read - before
        if report.caught_up:
            await _fold_touched(connection)
        report.offsets = {p: max(committed.get(p, 0), reader.next[p]) for p in partitions}
        await _count(connection, report)
        report.diffs = [await _compare(connection, table) for table in LIVE]
        if report.dry_run:
            return
        # Offsets move only where the rebuild read past the projector (it had none).
        await connection.executemany(
            "UPDATE consumer_offsets SET next_offset = $4, updated_at = now()"
            " WHERE consumer = $1 AND topic = $2 AND partition = $3 AND next_offset < $4",
            [(CONSUMER, topic, p, o) for p, o in report.offsets.items()],
        )
        await connection.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        report.kept = await _swap(connection, keep_old, stamp)
        swapped = True
    except asyncpg.LockNotAvailableError as exc:
        raise RebuildError(
            f"readers held the read models for over {lock_timeout:g}s, so nothing was "
            "swapped; run it again"
        ) from exc
    finally:
        if swapped:
            await transaction.commit()
            report.swapped = True
        elif not connection.is_closed():
            await transaction.rollback()
        report.seconds["locked"] = time.perf_counter() - locked


# -- reading the log ----------------------------------------------------------------------------


class _Reader:
    """Reads partitions from offset 0 up to given offsets, staging every decoded event."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        connection: asyncpg.Connection,
        topic: str,
        partitions: Sequence[int],
        report: RebuildReport,
        progress: Progress | None,
    ) -> None:
        from services.projector.apply import TRANSACTION_COLUMNS

        self.consumer = consumer
        self.connection = connection
        self.topic = topic
        self.next = dict.fromkeys(partitions, 0)
        """Per partition, the offset to read next (everything below it is staged)."""
        self.report = report
        self.progress = progress
        self.rows: list[tuple[Any, ...]] = []
        self.columns = (*TRANSACTION_COLUMNS, "log_partition", "log_offset", "phase")
        self.started: set[int] = set()

    def behind(self, offsets: Mapping[int, int]) -> int:
        return sum(max(0, offsets.get(p, 0) - n) for p, n in self.next.items())

    async def read(
        self, stops: Mapping[int, int | None], *, phase: int, quiet: float | None = None
    ) -> None:
        """Read each partition up to ``stops[p]``, or, where that is None, until ``quiet``
        seconds pass with nothing new. A bounded partition that stops short (no progress
        for ``STALL_SECONDS``) is an error: the log no longer holds what the projector
        applied."""
        from aiokafka import TopicPartition

        quiet = STALL_SECONDS if quiet is None else quiet

        active = {p for p, stop in stops.items() if stop is None or self.next[p] < stop}
        if not active:
            return
        tps = {p: TopicPartition(self.topic, p) for p in active}
        self.consumer.assign(list(tps.values()))
        for p, tp in tps.items():
            self.consumer.seek(tp, self.next[p])
        total = sum(s for s in stops.values() if s is not None) or None
        moved_at = time.monotonic()
        while active:
            fetched = await self.consumer.getmany(
                *(tps[p] for p in active), timeout_ms=200, max_records=_CHUNK
            )
            taken = 0
            for tp, records in fetched.items():
                taken += self._take(records, stops[tp.partition], phase)
            if len(self.rows) >= _CHUNK:
                await self.flush()
            moved = False
            for p in sorted(active):
                stop = stops[p]
                # The consumer's position also steps over offsets that hold no record.
                position = await self.consumer.position(tps[p])
                reached = position if stop is None else min(position, stop)
                if reached > self.next[p]:
                    self.next[p], moved = reached, True
                if stop is not None and self.next[p] >= stop:
                    active.discard(p)
            if taken:
                self.report.records_read += taken
                if self.progress is not None:
                    if total is None:  # reading to the end: the fetched high watermarks
                        marks = [self.consumer.highwater(tp) for tp in tps.values()]
                        total = sum(m for m in marks if m is not None) or None
                    self.progress(taken, total)
            if moved:
                moved_at = time.monotonic()
            elif time.monotonic() - moved_at > quiet:
                if any(stops[p] is not None for p in active):
                    stuck = ", ".join(f"{p} at {self.next[p]} of {stops[p]}" for p in active)
                    raise RebuildError(
                        f"{self.topic} ends before the offsets the projector applied "
                        f"(partition {stuck}): the log no longer holds what the read models "
                        "were built from"
                    )
                break

    def _take(self, records: list[ConsumerRecord], stop: int | None, phase: int) -> int:
        """Stage the records below ``stop``; return how many there were."""
        from services.core.events import decode_priced
        from services.projector.apply import _row

        taken = 0
        for record in records:
            p, offset = record.partition, record.offset
            if stop is not None and offset >= stop:
                break
            if offset < self.next[p]:
                continue  # already staged (never expected after a seek)
            if p not in self.started:
                if offset != 0:
                    raise RebuildError(
                        f"{self.topic}[{p}] starts at offset {offset}, not 0 (retention?): "
                        "the read models cannot be re-derived from what is left"
                    )
                self.started.add(p)
            taken += 1
            try:
                event = decode_priced(record.value)
            except Exception:  # the projector dead-letters these: never applied
                self.report.undecodable += 1
                continue
            self.rows.append((*_row(event), p, offset, phase))
        return taken

    async def flush(self) -> None:
        if self.rows:
            await self.connection.copy_records_to_table(
                STAGING, records=self.rows, columns=self.columns
            )
            self.rows = []


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    # All topics, never this one by name: Tansu would create a missing topic.
    if topic not in await consumer.topics():
        raise RebuildError(f"topic {topic} does not exist (is BILLING_TOPIC_PREFIX right?)")
    return sorted(consumer.partitions_for_topic(topic) or ())


async def _refuse_other_topics(connection: asyncpg.Connection, consumer: str, topic: str) -> None:
    others = await connection.fetch(
        "SELECT DISTINCT topic FROM consumer_offsets WHERE consumer = $1 AND topic <> $2",
        consumer,
        topic,
    )
    if others:
        names = ", ".join(sorted(r["topic"] for r in others))
        raise RebuildError(
            f"the projector also fed these read models from {names}: a rebuild from {topic} "
            "alone would drop their rows (is BILLING_TOPIC_PREFIX right?)"
        )


# -- folding ------------------------------------------------------------------------------------


async def _create_tables(connection: asyncpg.Connection) -> None:
    for table in LIVE:  # leftovers of an interrupted run are ours to drop
        await connection.execute(f"DROP TABLE IF EXISTS {table}{SUFFIX}")
        await connection.execute(f"CREATE TABLE {table}{SUFFIX} (LIKE {table} INCLUDING ALL)")
    await connection.execute(f"DROP TABLE IF EXISTS {STAGING}")
    await connection.execute(
        f"CREATE TEMP TABLE {STAGING} (LIKE billing_transactions INCLUDING DEFAULTS,"
        " log_partition integer NOT NULL, log_offset bigint NOT NULL, phase smallint NOT NULL)"
    )


def _fold_sql() -> tuple[str, str, str]:
    """(transaction columns, summary columns, summary sums) as SQL lists."""
    from services.projector.apply import SUMMARY_VALUES, TRANSACTION_COLUMNS

    return (
        ", ".join(TRANSACTION_COLUMNS),
        ", ".join((*SUMMARY_KEY_SQL, *SUMMARY_VALUES)),
        ", ".join(f"sum({c})" for c in SUMMARY_VALUES),
    )


async def _fold_all(connection: asyncpg.Connection) -> None:
    """Winning rows from the staged events, then the summary as their aggregate."""
    columns, summary_columns, sums = _fold_sql()
    await connection.execute(
        f"INSERT INTO billing_transactions{SUFFIX} ({columns})"  # noqa: S608  # fixed names
        f" SELECT DISTINCT ON (request_id) {columns} FROM {STAGING} ORDER BY {_WINNER_ORDER}"
    )
    await connection.execute(
        f"INSERT INTO tenant_billing_summary{SUFFIX} ({summary_columns})"  # noqa: S608
        f" SELECT {_KEY_EXPRS}, {sums} FROM billing_transactions{SUFFIX} GROUP BY {_KEY_EXPRS}"
    )


async def _fold_touched(connection: asyncpg.Connection) -> None:
    """Fold again the requests that got events in the swap transaction (phase 2), and the
    summary rows of their old and new keys."""
    columns, summary_columns, sums = _fold_sql()
    touched = "request_id IN (SELECT request_id FROM rebuild_events WHERE phase = 2)"
    await connection.execute(
        "CREATE TEMP TABLE rebuild_keys ON COMMIT DROP AS"  # noqa: S608
        f" SELECT {_KEY_EXPRS} FROM billing_transactions{SUFFIX} WHERE {touched}"
    )
    await connection.execute(f"DELETE FROM billing_transactions{SUFFIX} WHERE {touched}")  # noqa: S608
    await connection.execute(
        f"INSERT INTO billing_transactions{SUFFIX} ({columns})"  # noqa: S608
        f" SELECT DISTINCT ON (request_id) {columns} FROM {STAGING}"
        f" WHERE {touched} ORDER BY {_WINNER_ORDER}"
    )
    await connection.execute(
        f"INSERT INTO rebuild_keys SELECT {_KEY_EXPRS}"  # noqa: S608
        f" FROM billing_transactions{SUFFIX} WHERE {touched}"
    )
    await connection.execute(
        f"DELETE FROM tenant_billing_summary{SUFFIX}"  # noqa: S608
        f" WHERE ({', '.join(SUMMARY_KEY_SQL)}) IN (SELECT * FROM rebuild_keys)"
    )
    await connection.execute(
        f"INSERT INTO tenant_billing_summary{SUFFIX} ({summary_columns})"  # noqa: S608
        f" SELECT {_KEY_EXPRS}, {sums} FROM billing_transactions{SUFFIX}"
        f" WHERE ({_KEY_EXPRS}) IN (SELECT * FROM rebuild_keys) GROUP BY {_KEY_EXPRS}"
    )


async def _count(connection: asyncpg.Connection, report: RebuildReport) -> None:
    row = await connection.fetchrow(
        f"SELECT (SELECT count(*) FROM {STAGING}) AS events,"  # noqa: S608
        f" (SELECT count(*) FROM billing_transactions{SUFFIX}) AS transactions,"
        f" (SELECT count(*) FROM tenant_billing_summary{SUFFIX}) AS summary_rows,"
        f" (SELECT count(*) FROM {STAGING} e JOIN billing_transactions{SUFFIX} w"
        "   USING (request_id) WHERE e.revision < w.revision) AS superseded"
    )
    report.transactions = row["transactions"]
    report.summary_rows = row["summary_rows"]
    report.superseded = row["superseded"]
    report.duplicates = row["events"] - row["transactions"] - row["superseded"]
