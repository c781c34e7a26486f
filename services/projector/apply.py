"""Apply a batch of ``UsagePriced`` events to PostgreSQL in one transaction.

Per batch: the batch's partitions' stored offsets are locked (fencing out events already
applied), the rows of the requests it touches are locked, :func:`~services.projector.plan.plan`
decides what changes (new rows, winning revisions, summary deltas, adjustments), and this
module writes exactly that, with the consumed offsets, in the same transaction. Replaying
any prefix of the log therefore changes nothing, and a crash at any point leaves either the
whole batch or none of it.

``billing_transactions`` is partitioned by month (migration 005), so the database keys a
row by (request_id, occurred_at): one row per request_id across months is kept here, by
looking each request_id up in every partition (under the fence) before planning. Events of
a retired month (``partitions.retired_before``) are counted and not applied; a month's
partition is created the first time a row needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.adapters.metrics import observe_reported_drift
from services.adapters.offsets import Offsets, lock_offsets, store_offsets
from services.adapters.partitions import create_partitions, retired_before
from services.adapters.readmodels import (
    ADJUSTMENT_COLUMNS,
    SUMMARY_KEY,
    SUMMARY_VALUES,
    TRANSACTION_COLUMNS,
    SummaryKey,
)
from services.adapters.spend_minutes import add_minutes
from services.core.events import Position, UsagePriced
from services.core.periods import months_of
from services.projector.plan import Row, plan

_OCCURRED_AT = TRANSACTION_COLUMNS.index("occurred_at")


@dataclass(slots=True)
class BatchResult:
    inserted: int = 0
    revised: int = 0
    duplicates: int = 0
    retired: int = 0
    """Events of a retired month: not applied (the month's totals are frozen)."""


async def apply_batch(
    connection: asyncpg.Connection,
    consumer: str,
    events: Sequence[UsagePriced],
    offsets: Offsets,
    positions: Sequence[Position] | None = None,
) -> BatchResult:
    """Apply ``events`` and store ``offsets`` (topic, partition → next offset) atomically.

    With ``positions`` (one per event), the batch is fenced: the partitions' stored offsets
    are locked first and events below them are skipped, so two projectors that briefly
    both hold a partition (a rebalance mid-batch) cannot both apply the same events.
    """
    async with connection.transaction():
        fresh = events
        if offsets:
            stored = await lock_offsets(connection, consumer, offsets)
            if positions is not None:
                fresh = [
                    e
                    for e, p in zip(events, positions, strict=True)
                    if p.offset >= stored.get((p.topic, p.partition), 0)
                ]
        live = fresh
        if (horizon := await retired_before(connection)) is not None:
            live = [e for e in fresh if e.occurred_at >= horizon]
        batch = plan(await _lock_rows(connection, {e.request_id for e in live}), live)
        if batch.moved:
            await _delete_moved(connection, batch.moved)
        if batch.rows:
            await create_partitions(connection, months_of(row[_OCCURRED_AT] for row in batch.rows))
            await _upsert_transactions(connection, batch.rows)
        if batch.deltas:
            await _apply_summary(connection, batch.deltas)
        if batch.minutes:
            await add_minutes(connection, batch.minutes)
        if batch.adjustments:
            await connection.copy_records_to_table(
                "billing_adjustments", records=batch.adjustments, columns=ADJUSTMENT_COLUMNS
            )
        if offsets:
            await store_offsets(connection, consumer, offsets)
    observe_reported_drift(batch.drifts)  # after the commit: a retried batch counts once
    # Fenced-out events count as duplicates too: they were applied by an earlier batch.
    fenced = len(events) - len(fresh)
    retired = len(fresh) - len(live)
    return BatchResult(batch.inserted, batch.revised, batch.duplicates + fenced, retired)


async def _lock_rows(connection: asyncpg.Connection, request_ids: set[str]) -> dict[str, Row]:
    """request_id → stored row (``TRANSACTION_COLUMNS`` order), locked until the commit."""
    records = await connection.fetch(
        f"SELECT {', '.join(TRANSACTION_COLUMNS)} FROM billing_transactions"  # noqa: S608
        " WHERE request_id = ANY($1::text[]) FOR UPDATE",
        list(request_ids),
    )
    return {r["request_id"]: tuple(r.values()) for r in records}


async def _delete_moved(connection: asyncpg.Connection, moved: list[tuple[str, Any]]) -> None:
    """Delete the stored rows whose revision moved them to another occurred_at."""
    await connection.execute(
        "DELETE FROM billing_transactions WHERE (request_id, occurred_at) IN"
        " (SELECT * FROM unnest($1::text[], $2::timestamptz[]))",
        [request_id for request_id, _ in moved],
        [occurred_at for _, occurred_at in moved],
    )


async def _upsert_transactions(connection: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> None:
    await connection.execute(
        "CREATE TEMP TABLE IF NOT EXISTS incoming_transactions"
        " (LIKE billing_transactions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )
    await connection.copy_records_to_table(
        "incoming_transactions", records=rows, columns=TRANSACTION_COLUMNS
    )
    assignments = ", ".join(f"{c} = EXCLUDED.{c}" for c in TRANSACTION_COLUMNS[1:])
    await connection.execute(
        f"INSERT INTO billing_transactions ({', '.join(TRANSACTION_COLUMNS)})"  # noqa: S608
        f" SELECT {', '.join(TRANSACTION_COLUMNS)} FROM incoming_transactions"
        f" ON CONFLICT (request_id, occurred_at) DO UPDATE SET {assignments}, projected_at = now()"
        " WHERE billing_transactions.revision < EXCLUDED.revision"
    )


async def _apply_summary(
    connection: asyncpg.Connection, deltas: dict[SummaryKey, tuple[Any, ...]]
) -> None:
    await connection.execute(
        "CREATE TEMP TABLE IF NOT EXISTS incoming_summary"
        " (LIKE tenant_billing_summary INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )
    columns = (*SUMMARY_KEY, *SUMMARY_VALUES)
    await connection.copy_records_to_table(
        "incoming_summary",
        records=[(*key, *values) for key, values in deltas.items()],
        columns=columns,
    )
    increments = ", ".join(
        f"{c} = tenant_billing_summary.{c} + EXCLUDED.{c}" for c in SUMMARY_VALUES
    )
    await connection.execute(
        f"INSERT INTO tenant_billing_summary ({', '.join(columns)})"  # noqa: S608
        f" SELECT {', '.join(columns)} FROM incoming_summary"
        f" ON CONFLICT (tenant_id, day, model, api_key_id) DO UPDATE SET {increments},"
        " updated_at = now()"
    )
