"""``billing rebuild``: re-derive the read models from the cost topic and swap them in.

``billing_transactions``, ``tenant_billing_summary`` and ``billing_spend_minutes`` are folds
of ``billing.costs.v1``: per ``request_id`` the highest revision wins (the first one in log
order among equals, as the projector keeps it), the summary is the sum of the winning rows by
tenant × UTC day of ``occurred_at`` × model × ``coalesce(api_key_id, '')``
(``readmodels.summary_key``), and the minutes are their count and total cost by tenant × UTC
minute of ``occurred_at`` (``readmodels.minute_key``). The rebuild computes that fold from
offset 0 of every partition into fresh tables (``*_rebuild``, ``LIKE … INCLUDING ALL``,
filled by COPY and ``INSERT … SELECT``) and replaces the live tables with them in one
transaction.

Where it stops: at the offsets the projector has committed (``consumer_offsets``), never at
the broker's end offsets (Tansu under-reports them). It reads up to a snapshot of those
offsets without holding anything, then, in the swap transaction, locks the offset rows as
the projector does (so no projector batch commits meanwhile) and the tables a projector
batch writes in EXCLUSIVE mode (writers wait, readers do not), reads the records the
projector committed since the snapshot, folds them in (their requests, and the summary rows
and minutes of their old and new keys) and swaps. The new tables are therefore the
fold of exactly the prefix of the log the live ones reflected. With no projector offsets
at all (a fresh database) the log is read until no record arrived for ``idle_seconds``,
and the offsets reached are stored with the tables, so a projector started later goes on
from there.

The swap: foreign keys that point at a live table (none since migration 005) are
dropped, the live table is dropped (or kept as ``*_before_rebuild_<UTC time>``), the
rebuilt one takes its name, its indexes the live indexes' names (so constraint names and
the next rebuild stay the same), the live table's owner and grants, and the foreign keys
are added back (``NOT VALID`` + ``VALIDATE``) against it. Readers see the old tables or the
new ones, never a mix; the renames wait at most ``lock_timeout`` seconds for readers, after
which nothing has changed. The comparison with the live tables is made under the same
locks (a consistent pair), so the projector waits for it too; readers never do.

Minutes: the projector keeps ``MINUTES_KEPT_DAYS`` of them and prunes older ones hourly.
The fold derives every minute from ``now - MINUTES_KEPT_DAYS`` rounded down to a whole
minute (so its first minute counts all its requests, as the live one does), outside the
locks. In the swap transaction the rebuilt minutes before the projector's pruning bound as
of then (or before the end of the retired months, if later) are replaced by the live ones as
they are: those are the projector's to prune, or frozen, so the swap neither drops a minute
the dashboard still has nor brings back one pruned while the rebuild ran. They are few (an
hour's worth, and the fold's duration) and found by the index on ``minute``.

Equality (``--dry-run`` and the report): every column but ``projected_at`` and
``updated_at``, which say when a row was written; live summary and minute rows whose every
value is zero (left behind when a revision moved a request to another key) count as absent.

Monthly partitions (migration 005): the rebuilt ``billing_transactions`` is partitioned
like the live one, with a partition for every month the live table or the log has; the
swap renames them too. Retired months (``billing_retired_months``) stay frozen: their
events are not folded (``retired`` in the report) and their summary rows and minutes are the
live ones.

Here: the command and the fold; reading the log is in ``services.jobs.rebuild_reader``, the
comparison and the swap itself are in ``services.jobs.rebuild_tables``.

RebuildError        the rebuild was refused or could not finish; nothing was swapped
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from services.adapters.offsets import lock_offsets, store_offsets, stored_offsets
from services.adapters.partitions import create_partitions, partition_months, retired_before
from services.adapters.readmodels import (
    PROJECTOR_CONSUMER,
    REBUILD_LOCK,
    SUMMARY_KEY,
    SUMMARY_VALUES,
    TRANSACTION_COLUMNS,
)
from services.adapters.spend_minutes import KEPT
from services.jobs.rebuild_reader import STAGING, LogReader, Progress, topic_partitions
from services.jobs.rebuild_tables import (
    LIVE,
    MINUTE_KEY_SQL,
    MINUTE_VALUES,
    SUFFIX,
    SUMMARY_KEY_SQL,
    RebuildError,
    TableDiff,
    compare,
    name_rebuilt_indexes,
    swap,
)

# The CLI imports this module whenever it starts (``billing quote --batch`` must stay fast),
# so asyncpg, aiokafka and pydantic are imported by the functions using them.
if TYPE_CHECKING:
    import asyncpg


FENCED = (*LIVE, "billing_adjustments")
"""Every table a projector batch writes: locked EXCLUSIVE (writers wait) during the swap."""
_KEY_EXPRS = ", ".join(SUMMARY_KEY_SQL.values())
_MINUTE_EXPRS = ", ".join(f"{sql} AS {name}" for name, sql in MINUTE_KEY_SQL.items())
_MINUTE_SUMS = "count(*), sum(total_cost)"
"""``MINUTE_VALUES`` of a group of transactions."""
_WINNER_ORDER = "request_id, revision DESC, log_partition, log_offset"
"""Highest revision; among equals the first in log order, the one the projector kept."""

_WORK_MEM = "256MB"
_CATCH_UP_ROUNDS = 3
_CATCH_UP_UNLOCKED = 1000
"""Read without locks until fewer records than this remain, so the swap stays short."""


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
    retired: int = 0
    """Events of retired months: not folded (those months are frozen)."""
    horizon: datetime | None = None
    """Where the retired months end (None: none retired)."""
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
            "retired_events": self.retired,
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
    from services.adapters.kafka import make_consumer

    if tuple(SUMMARY_KEY_SQL) != SUMMARY_KEY:
        raise RebuildError(f"the summary key is now {SUMMARY_KEY}: update SUMMARY_KEY_SQL")
    report = RebuildReport(dry_run=dry_run)
    started = time.perf_counter()
    if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", REBUILD_LOCK):
        raise RebuildError("another rebuild is running on this database")
    # Sorts and hashes of whole tables (the fold, the EXCEPTs) stay in memory, 3× faster
    # than spilling at the default 4MB; this session only, one rebuild at a time.
    await connection.execute(f"SET work_mem = '{_WORK_MEM}'")
    # From the earliest record (a vanished offset 0 shows as a later first record), never
    # committing, with every service's fetch wait and TLS/SASL options.
    consumer = make_consumer(
        bootstrap,
        group_id=None,  # positions are ours: nothing is committed anywhere
        max_partition_fetch_bytes=8 << 20,  # fewer round trips: the whole log is wanted
    )
    try:
        await _refuse_other_topics(connection, PROJECTOR_CONSUMER, topic)
        await consumer.start()
        partitions = await topic_partitions(consumer, topic)
        await _create_tables(connection)
        reader = LogReader(consumer, connection, topic, partitions, progress)
        snapshot = await stored_offsets(connection, PROJECTOR_CONSUMER, topic)
        if unknown := sorted(set(snapshot) - set(partitions)):
            raise RebuildError(f"projector offsets for partitions {unknown} {topic} does not have")
        if snapshot:
            for _ in range(_CATCH_UP_ROUNDS):
                await reader.read({p: snapshot.get(p, 0) for p in partitions}, phase=1)
                snapshot = await stored_offsets(connection, PROJECTOR_CONSUMER, topic)
                if reader.behind(snapshot) < _CATCH_UP_UNLOCKED:
                    break
        else:
            report.stop = "end of log"
            await reader.read(dict.fromkeys(partitions), phase=1, quiet=idle_seconds)
        await reader.flush()
        report.records_read, report.undecodable = reader.records_read, reader.undecodable
        report.seconds["read"] = time.perf_counter() - started
        folding = time.perf_counter()
        report.horizon = await retired_before(connection)
        report.retired = await _drop_retired(connection, report.horizon)
        since = _first_whole_minute(datetime.now(UTC))
        await _fold_all(connection, report.horizon, since)
        report.seconds["fold"] = time.perf_counter() - folding
        if before_lock is not None:
            await before_lock()
        await _swap_transaction(connection, reader, report, since, keep_old, lock_timeout)
    finally:
        await consumer.stop()
        if not connection.is_closed():
            if not report.swapped:
                for table in LIVE:
                    await connection.execute(f"DROP TABLE IF EXISTS {table}{SUFFIX}")
            await connection.execute(f"DROP TABLE IF EXISTS {STAGING}")
            await connection.execute("SELECT pg_advisory_unlock($1)", REBUILD_LOCK)
            await connection.execute("RESET work_mem")
    report.seconds["total"] = time.perf_counter() - started
    return report


async def _swap_transaction(
    connection: asyncpg.Connection,
    reader: LogReader,
    report: RebuildReport,
    since: datetime,
    keep_old: bool,
    lock_timeout: float,
) -> None:
    """Fence the projector, catch up to its offsets, compare, and (unless dry) swap;
    ``since`` is where the fold's minutes start."""
    import asyncpg

    locked = time.perf_counter()
    topic, partitions = reader.topic, sorted(reader.next)
    transaction = connection.transaction()
    await transaction.start()
    swapped = False
    try:
        # The projector's order: offset rows (every partition, so a batch on any of them
        # waits), then the tables; EXCLUSIVE also fences a partition that appears meanwhile.
        await lock_offsets(connection, PROJECTOR_CONSUMER, {(topic, p): 0 for p in partitions})
        await connection.execute(f"LOCK TABLE {', '.join(FENCED)} IN EXCLUSIVE MODE")
        if await retired_before(connection) != report.horizon:
            raise RebuildError("the projector retired a month during the rebuild: run it again")
        committed = await stored_offsets(connection, PROJECTOR_CONSUMER, topic)
        before = reader.records_read
        await reader.read({p: committed.get(p, 0) for p in partitions}, phase=2)
        await reader.flush()
        report.caught_up = reader.records_read - before
        report.records_read, report.undecodable = reader.records_read, reader.undecodable
        if report.caught_up:
            report.retired += await _drop_retired(connection, report.horizon)
            await _fold_touched(connection, since)
        await _carry_live_minutes(
            connection, _live_minutes_before(datetime.now(UTC), report.horizon)
        )
        report.offsets = {p: max(committed.get(p, 0), reader.next[p]) for p in partitions}
        await _count(connection, report)
        report.diffs = [await compare(connection, table) for table in LIVE]
        if report.dry_run:
            return
        # Offsets move only where the rebuild read past the projector (it had none).
        await store_offsets(
            connection, PROJECTOR_CONSUMER, {(topic, p): o for p, o in report.offsets.items()}
        )
        await connection.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        report.kept = await swap(connection, keep_old, stamp)
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


# -- guarding and folding ----------------------------------------------------------------------


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


async def _create_tables(connection: asyncpg.Connection) -> None:
    for table in LIVE:  # leftovers of an interrupted run are ours to drop
        await connection.execute(f"DROP TABLE IF EXISTS {table}{SUFFIX}")
    await connection.execute(
        f"CREATE TABLE billing_transactions{SUFFIX} (LIKE billing_transactions INCLUDING ALL)"
        " PARTITION BY RANGE (occurred_at)"
    )
    await name_rebuilt_indexes(connection, "billing_transactions")
    await create_partitions(
        connection, await partition_months(connection), table=f"billing_transactions{SUFFIX}"
    )
    for table in ("tenant_billing_summary", "billing_spend_minutes"):
        await connection.execute(f"CREATE TABLE {table}{SUFFIX} (LIKE {table} INCLUDING ALL)")
    await connection.execute(f"DROP TABLE IF EXISTS {STAGING}")
    await connection.execute(
        f"CREATE TEMP TABLE {STAGING} (LIKE billing_transactions INCLUDING DEFAULTS,"
        " log_partition integer NOT NULL, log_offset bigint NOT NULL, phase smallint NOT NULL)"
    )


def _fold_sql() -> tuple[str, str, str]:
    """(transaction columns, summary columns, summary sums) as SQL lists."""
    return (
        ", ".join(TRANSACTION_COLUMNS),
        ", ".join((*SUMMARY_KEY_SQL, *SUMMARY_VALUES)),
        ", ".join(f"sum({c})" for c in SUMMARY_VALUES),
    )


def _first_whole_minute(now: datetime) -> datetime:
    """The first minute the fold derives: ``now - MINUTES_KEPT_DAYS`` rounded down, so it
    holds every request of that minute, as the live minute does."""
    return (now - KEPT).replace(second=0, microsecond=0)


def _live_minutes_before(now: datetime, horizon: datetime | None) -> datetime:
    """Minutes before this stay the live ones: older than the projector keeps at ``now``
    (pruned, or not yet), or in a retired month (frozen)."""
    pruned = now - KEPT
    return pruned if horizon is None else max(pruned, horizon)


async def _fold_all(
    connection: asyncpg.Connection, horizon: datetime | None, since: datetime
) -> None:
    """Winning rows from the staged events, then the summary and the minutes from ``since``
    as their aggregates (and the live summary rows of the retired months, which are
    frozen)."""
    columns, summary_columns, sums = _fold_sql()
    await _create_staged_partitions(connection, "true")
    await connection.execute(
        f"INSERT INTO billing_transactions{SUFFIX} ({columns})"  # noqa: S608  # fixed names
        f" SELECT DISTINCT ON (request_id) {columns} FROM {STAGING} ORDER BY {_WINNER_ORDER}"
    )
    await connection.execute(
        f"INSERT INTO tenant_billing_summary{SUFFIX} ({summary_columns})"  # noqa: S608
        f" SELECT {_KEY_EXPRS}, {sums} FROM billing_transactions{SUFFIX} GROUP BY {_KEY_EXPRS}"
    )
    await connection.execute(
        f"INSERT INTO billing_spend_minutes{SUFFIX} ({_minute_columns()})"  # noqa: S608
        f" SELECT {_MINUTE_EXPRS}, {_MINUTE_SUMS} FROM billing_transactions{SUFFIX}"
        " WHERE occurred_at >= $1 GROUP BY 1, 2",
        since,
    )
    if horizon is not None:
        await connection.execute(
            f"INSERT INTO tenant_billing_summary{SUFFIX}"  # noqa: S608
            " SELECT * FROM tenant_billing_summary WHERE day < $1",
            horizon.date(),
        )


async def _create_staged_partitions(connection: asyncpg.Connection, where: str) -> None:
    """The rebuilt table's partitions for the months of the staged events ``where`` holds."""
    months = await connection.fetch(
        "SELECT DISTINCT date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date AS month"  # noqa: S608
        f" FROM {STAGING} WHERE {where}"
    )
    await create_partitions(
        connection, [r["month"] for r in months], table=f"billing_transactions{SUFFIX}"
    )


async def _drop_retired(connection: asyncpg.Connection, horizon: datetime | None) -> int:
    """Remove the staged events of retired months (never folded: the projector's rule too);
    return how many there were."""
    if horizon is None:
        return 0
    status = await connection.execute(f"DELETE FROM {STAGING} WHERE occurred_at < $1", horizon)  # noqa: S608
    return int(status.split()[-1])


async def _fold_touched(connection: asyncpg.Connection, since: datetime) -> None:
    """Fold again the requests that got events in the swap transaction (phase 2), then the
    summary rows and the minutes (from ``since``) of their old and new keys."""
    columns, _, _ = _fold_sql()
    await _create_staged_partitions(connection, "phase = 2")
    touched = "request_id IN (SELECT request_id FROM rebuild_events WHERE phase = 2)"
    keyed = (  # what both keys are computed from
        f"SELECT tenant_id, occurred_at, model, api_key_id FROM billing_transactions{SUFFIX}"  # noqa: S608
        f" WHERE {touched}"
    )
    await connection.execute(f"CREATE TEMP TABLE rebuild_touched ON COMMIT DROP AS {keyed}")
    await connection.execute(f"DELETE FROM billing_transactions{SUFFIX} WHERE {touched}")  # noqa: S608
    await connection.execute(
        f"INSERT INTO billing_transactions{SUFFIX} ({columns})"  # noqa: S608
        f" SELECT DISTINCT ON (request_id) {columns} FROM {STAGING}"
        f" WHERE {touched} ORDER BY {_WINNER_ORDER}"
    )
    await connection.execute(f"INSERT INTO rebuild_touched {keyed}")
    await _sum_touched_summary(connection)
    await _sum_touched_minutes(connection, since)


async def _sum_touched_summary(connection: asyncpg.Connection) -> None:
    """The summary rows of the keys in ``rebuild_touched``, summed again."""
    _, summary_columns, sums = _fold_sql()
    keys = f"SELECT {_KEY_EXPRS} FROM rebuild_touched"  # noqa: S608  # fixed names
    await connection.execute(
        f"DELETE FROM tenant_billing_summary{SUFFIX}"  # noqa: S608
        f" WHERE ({', '.join(SUMMARY_KEY_SQL)}) IN ({keys})"
    )
    await connection.execute(
        f"INSERT INTO tenant_billing_summary{SUFFIX} ({summary_columns})"  # noqa: S608
        f" SELECT {_KEY_EXPRS}, {sums} FROM billing_transactions{SUFFIX}"
        f" WHERE ({_KEY_EXPRS}) IN ({keys}) GROUP BY {_KEY_EXPRS}"
    )


async def _sum_touched_minutes(connection: asyncpg.Connection, since: datetime) -> None:
    """The minutes (from ``since``) of the keys in ``rebuild_touched``, counted again."""
    await connection.execute(
        "CREATE TEMP TABLE rebuild_minutes ON COMMIT DROP AS"  # noqa: S608
        f" SELECT DISTINCT {_MINUTE_EXPRS} FROM rebuild_touched"
    )
    await connection.execute("ANALYZE rebuild_minutes")  # a few keys: plan the join for that
    await connection.execute(
        f"DELETE FROM billing_spend_minutes{SUFFIX}"  # noqa: S608
        f" WHERE ({', '.join(MINUTE_KEY_SQL)}) IN (SELECT * FROM rebuild_minutes)"
    )
    # Each minute a range of the (tenant_id, occurred_at, …) index, not a pass over every row.
    await connection.execute(
        f"INSERT INTO billing_spend_minutes{SUFFIX} ({_minute_columns()})"  # noqa: S608
        f" SELECT k.tenant_id, k.minute, {_MINUTE_SUMS} FROM rebuild_minutes k"
        f" JOIN billing_transactions{SUFFIX} t ON t.tenant_id = k.tenant_id"
        " AND t.occurred_at >= k.minute AND t.occurred_at < k.minute + interval '1 minute'"
        " WHERE k.minute >= $1 GROUP BY 1, 2",
        since,
    )


async def _carry_live_minutes(connection: asyncpg.Connection, before: datetime) -> None:
    """Replace the rebuilt minutes before ``before`` by the live ones, as they are."""
    await connection.execute(f"DELETE FROM billing_spend_minutes{SUFFIX} WHERE minute < $1", before)  # noqa: S608
    await connection.execute(
        f"INSERT INTO billing_spend_minutes{SUFFIX}"  # noqa: S608
        " SELECT * FROM billing_spend_minutes WHERE minute < $1",
        before,
    )


def _minute_columns() -> str:
    return ", ".join((*MINUTE_KEY_SQL, *MINUTE_VALUES))


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
