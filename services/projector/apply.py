"""Apply a batch of ``UsagePriced`` events to PostgreSQL in one transaction.

Per batch: the rows of the requests it touches are locked; an unseen request is inserted, a
newer revision replaces the row and books a ``billing_adjustments`` row, an equal or older
revision is a duplicate and changes nothing; ``tenant_billing_summary`` moves by exactly the
applied differences; the consumed offsets are stored in the same transaction. Replaying any
prefix of the log therefore changes nothing, and a crash at any point leaves either the whole
batch or none of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, localcontext
from typing import Any

import asyncpg

from services.adapters.metrics import observe_reported_drift
from services.core.cost import COMPONENTS
from services.core.events import Position, UsagePriced
from services.core.money import EXACT
from services.core.usage import Usage

COUNT_COLUMNS = Usage._fields  # one column per normalised count
COST_COLUMNS = (*COMPONENTS, "total_cost")  # one column per breakdown component
TRANSACTION_COLUMNS = (
    "request_id",
    "tenant_id",
    "api_key_id",
    "provider",
    "provider_model_id",
    "model",
    "occurred_at",
    "recorded_at",
    "usage_source",
    *COUNT_COLUMNS,
    *COST_COLUMNS,
    "currency",
    "reported_cost",
    "reported_is_byok",
    "price_version",
    "revision",
    "priced_at",
    "metadata",
)
_TOTAL = TRANSACTION_COLUMNS.index("total_cost")
_REPORTED = TRANSACTION_COLUMNS.index("reported_cost")
SUMMARY_KEY = ("tenant_id", "day", "model", "api_key_id")
SUMMARY_VALUES = (*COUNT_COLUMNS, *COST_COLUMNS)
ADJUSTMENT_COLUMNS = (
    "request_id",
    "tenant_id",
    "old_revision",
    "new_revision",
    "old_total_cost",
    "new_total_cost",
    "delta_cost",
    "price_version",
    "reason",
)


@dataclass(slots=True)
class BatchResult:
    inserted: int = 0
    revised: int = 0
    duplicates: int = 0


def _row(event: UsagePriced) -> tuple[Any, ...]:
    usage, b = event.usage, event.breakdown
    reported = event.reported
    charge = None
    if reported is not None:
        charge = (
            reported.upstream_inference_cost
            if reported.is_byok and reported.upstream_inference_cost is not None
            else reported.cost
        )
    return (
        event.request_id,
        event.tenant_id,
        event.api_key_id,
        event.provider,
        event.provider_model_id,
        event.model,
        event.occurred_at,
        event.recorded_at,
        event.usage_source,
        *(getattr(usage, c) for c in COUNT_COLUMNS),
        *(getattr(b, c) for c in COST_COLUMNS),
        event.currency,
        charge,
        reported.is_byok if reported else False,
        event.price_version,
        event.revision,
        event.priced_at,
        event.metadata,
    )


def _summary_key(row: Sequence[Any]) -> tuple[str, date, str, str]:
    """(tenant, UTC day, model, api key) of a TRANSACTION_COLUMNS row."""
    occurred_at: datetime = row[6]
    return (row[1], occurred_at.astimezone(UTC).date(), row[5], row[2] or "")


def _add(
    deltas: dict[tuple[Any, ...], list[Any]], key: tuple[Any, ...], values: Iterable[Any], sign: int
) -> None:
    """Add (or subtract) one row's values to a summary key's deltas; callers run this in
    the exact context (sums of 30-place amounts need more than the default 28 digits)."""
    current = deltas.setdefault(key, [0] * len(COUNT_COLUMNS) + [Decimal(0)] * len(COST_COLUMNS))
    for index, value in enumerate(values):
        current[index] += sign * value


def newest_per_request(events: Iterable[UsagePriced]) -> list[UsagePriced]:
    """Collapse a batch to the highest revision of each request (duplicates drop out)."""
    best: dict[str, UsagePriced] = {}
    for event in events:
        held = best.get(event.request_id)
        if held is None or event.revision > held.revision:
            best[event.request_id] = event
    return list(best.values())


async def apply_batch(
    connection: asyncpg.Connection,
    consumer: str,
    events: Sequence[UsagePriced],
    offsets: dict[tuple[str, int], int],
    positions: Sequence[Position] | None = None,
) -> BatchResult:
    """Apply ``events`` and store ``offsets`` (topic, partition → next offset) atomically.

    With ``positions`` (one per event), the batch is fenced: the partitions' stored offsets
    are locked first and events below them are skipped, so two projectors that briefly
    both hold a partition (a rebalance mid-batch) cannot both apply the same events.
    """
    result = BatchResult(duplicates=len(events))
    async with connection.transaction():
        if offsets:
            stored = await _lock_offsets(connection, consumer, offsets)
            if positions is not None:
                events = [
                    e
                    for e, p in zip(events, positions, strict=True)
                    if p.offset >= stored.get((p.topic, p.partition), 0)
                ]
        latest = newest_per_request(events)
        existing = {
            r["request_id"]: r
            for r in await connection.fetch(
                f"SELECT {', '.join(TRANSACTION_COLUMNS)} FROM billing_transactions"  # noqa: S608
                " WHERE request_id = ANY($1::text[]) FOR UPDATE",
                [e.request_id for e in latest],
            )
        }
        rows: list[tuple[Any, ...]] = []
        deltas: dict[tuple[Any, ...], list[Any]] = {}
        adjustments: list[tuple[Any, ...]] = []
        drifts: list[Decimal] = []  # |computed - reported| of first-time rows (metrics)
        first = TRANSACTION_COLUMNS.index(SUMMARY_VALUES[0])
        value_slice = slice(first, first + len(SUMMARY_VALUES))
        with localcontext(EXACT):  # exact sums (see _add)
            for event in latest:
                row = _row(event)
                old = existing.get(event.request_id)
                if old is not None and old["revision"] >= event.revision:
                    continue  # a duplicate or a stale revision: already reflected
                rows.append(row)
                _add(deltas, _summary_key(row), row[value_slice], +1)
                if old is None:
                    result.inserted += 1
                    if (charge := row[_REPORTED]) is not None:
                        drifts.append(abs(row[_TOTAL] - charge))
                    continue
                old_row = tuple(old.values())
                _add(deltas, _summary_key(old_row), old_row[value_slice], -1)
                delta = event.total_cost - old["total_cost"]
                adjustments.append(
                    (
                        event.request_id,
                        event.tenant_id,
                        old["revision"],
                        event.revision,
                        old["total_cost"],
                        event.total_cost,
                        delta,
                        event.price_version,
                        event.reason,
                    )
                )
                result.revised += 1
        result.duplicates -= len(rows)
        if rows:
            await _upsert_transactions(connection, rows)
        if deltas:
            await _apply_summary(connection, deltas)
        if adjustments:
            await connection.copy_records_to_table(
                "billing_adjustments", records=adjustments, columns=ADJUSTMENT_COLUMNS
            )
        if offsets:
            await connection.executemany(
                "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (consumer, topic, partition)"
                " DO UPDATE SET next_offset = GREATEST(consumer_offsets.next_offset,"
                " EXCLUDED.next_offset), updated_at = now()",
                [(consumer, t, p, o) for (t, p), o in offsets.items()],
            )
    observe_reported_drift(drifts)  # after the commit: a retried batch counts once
    return result


async def _lock_offsets(
    connection: asyncpg.Connection, consumer: str, offsets: dict[tuple[str, int], int]
) -> dict[tuple[str, int], int]:
    """Lock (creating) the stored offsets of the batch's partitions; return them."""
    topics = [t for t, _ in sorted(offsets)]
    partitions = [p for _, p in sorted(offsets)]
    await connection.execute(
        "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset)"
        " SELECT $1, t, p, 0 FROM unnest($2::text[], $3::int[]) AS x(t, p)"
        " ON CONFLICT DO NOTHING",
        consumer,
        topics,
        partitions,
    )
    rows = await connection.fetch(
        "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer = $1"
        " AND (topic, partition) IN (SELECT * FROM unnest($2::text[], $3::int[]))"
        " ORDER BY topic, partition FOR UPDATE",
        consumer,
        topics,
        partitions,
    )
    return {(r["topic"], r["partition"]): r["next_offset"] for r in rows}


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
        f" ON CONFLICT (request_id) DO UPDATE SET {assignments}, projected_at = now()"
        " WHERE billing_transactions.revision < EXCLUDED.revision"
    )


async def _apply_summary(
    connection: asyncpg.Connection, deltas: dict[tuple[Any, ...], list[Any]]
) -> None:
    await connection.execute(
        "CREATE TEMP TABLE IF NOT EXISTS incoming_summary"
        " (LIKE tenant_billing_summary INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )
    await connection.copy_records_to_table(
        "incoming_summary",
        records=[(*key, *values) for key, values in deltas.items()],
        columns=(*SUMMARY_KEY, *SUMMARY_VALUES),
    )
    columns = (*SUMMARY_KEY, *SUMMARY_VALUES)
    increments = ", ".join(
        f"{c} = tenant_billing_summary.{c} + EXCLUDED.{c}" for c in SUMMARY_VALUES
    )
    await connection.execute(
        f"INSERT INTO tenant_billing_summary ({', '.join(columns)})"  # noqa: S608
        f" SELECT {', '.join(columns)} FROM incoming_summary"
        f" ON CONFLICT (tenant_id, day, model, api_key_id) DO UPDATE SET {increments},"
        " updated_at = now()"
    )


async def stored_offsets(
    connection: asyncpg.Connection, consumer: str, topic: str
) -> dict[int, int]:
    """partition → next offset to read, as last committed with the read models."""
    rows = await connection.fetch(
        "SELECT partition, next_offset FROM consumer_offsets WHERE consumer = $1 AND topic = $2",
        consumer,
        topic,
    )
    return {r["partition"]: r["next_offset"] for r in rows}
