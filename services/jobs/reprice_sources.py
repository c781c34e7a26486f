"""Where ``billing reprice`` reads the usage facts of a window from: the transactions in
PostgreSQL (every billed fact, long after the broker's retention) or the usage topic."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import asyncpg

from services.core.errors import PriceNotFound
from services.core.events import ReportedCharge, UsageCounts, UsageRecorded, decode_recorded
from services.core.pricebook import PriceLookup
from services.core.rerating import Current, Report, Window, cost_moved, model_of
from services.core.usage import Usage

FACT_COLUMNS = (
    "request_id, tenant_id, api_key_id, provider, provider_model_id, occurred_at, recorded_at,"
    " usage_source, prompt_tokens, uncached_input_tokens, cache_read_tokens, cache_write_tokens,"
    " cache_write_1h_tokens, completion_tokens, reasoning_tokens, web_search_requests, images,"
    " requests, reported_cost, reported_is_byok, metadata::text AS metadata, revision,"
    " total_cost"
)
_COUNTS = Usage._fields


def fact_of_row(row: asyncpg.Record) -> tuple[UsageRecorded, Current]:
    """The usage fact a transaction row was priced from, and the row's current state."""
    reported = None
    if row["reported_cost"] is not None:
        byok = row["reported_is_byok"]
        reported = ReportedCharge.model_construct(
            cost=None if byok else row["reported_cost"],
            upstream_inference_cost=row["reported_cost"] if byok else None,
            is_byok=byok,
        )
    fact = UsageRecorded.model_construct(
        event_type="UsageRecorded",
        schema_version=1,
        request_id=row["request_id"],
        tenant_id=row["tenant_id"],
        api_key_id=row["api_key_id"],
        provider=row["provider"],
        provider_model_id=row["provider_model_id"],
        occurred_at=row["occurred_at"],
        recorded_at=row["recorded_at"] or row["occurred_at"],
        usage=UsageCounts.model_construct(**{c: row[c] for c in _COUNTS}),
        usage_source=row["usage_source"],
        usage_format="normalised",
        reported=reported,
        metadata=json.loads(row["metadata"]),
    )
    return fact, Current(row["revision"], row["total_cost"])


def where_of(window: Window) -> tuple[str, list[Any]]:
    conditions = ["occurred_at >= $1", "occurred_at < $2"]
    args: list[Any] = [window.since, window.until]
    if window.model is not None:
        args.append(window.model)
        conditions.append(f"model = ${len(args)}")
    if window.tenant is not None:
        args.append(window.tenant)
        conditions.append(f"tenant_id = ${len(args)}")
    return " AND ".join(conditions), args


async def facts_from_db(
    connection: asyncpg.Connection, window: Window, batch: int
) -> AsyncIterator[list[asyncpg.Record]]:
    """The window's transaction rows, in batches (a cursor: memory stays flat)."""
    where, args = where_of(window)
    query = (
        f"SELECT {FACT_COLUMNS} FROM billing_transactions"  # noqa: S608  # fixed columns
        f" WHERE {where} ORDER BY occurred_at, request_id"
    )
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        cursor = connection.cursor(query, *args, prefetch=batch)
        chunk: list[asyncpg.Record] = []
        async for row in cursor:
            chunk.append(row)
            if len(chunk) >= batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def changed_rows(
    rows: Sequence[asyncpg.Record], book: PriceLookup, report: Report
) -> Iterable[tuple[UsageRecorded, Current]]:
    """The rows whose cost differs at today's prices, as (fact, current)."""
    for row in rows:
        usage = Usage(*(row[c] for c in _COUNTS))
        try:
            moved = cost_moved(
                book, row["provider_model_id"], usage, row["occurred_at"], row["total_cost"]
            )
        except PriceNotFound:
            report.unpriced += 1
            continue
        if moved:
            yield fact_of_row(row)


async def count_in_db(connection: asyncpg.Connection, window: Window) -> int:
    """How many transactions the window holds (the progress bar's length)."""
    where, args = where_of(window)
    query = f"SELECT count(*) FROM billing_transactions WHERE {where}"  # noqa: S608
    return int(await connection.fetchval(query, *args))


async def facts_from_topic(
    connection: asyncpg.Connection,
    bootstrap: str,
    topic: str,
    window: Window,
    book: PriceLookup,
    report: Report,
    batch: int,
    idle_seconds: float = 3.0,
) -> AsyncIterator[list[tuple[UsageRecorded, Current]]]:
    """The usage topic from its start; the log's end is where nothing new came for
    ``idle_seconds`` (end offsets are not trusted: some brokers under-report them)."""
    from services.adapters.kafka import make_consumer

    consumer = make_consumer(
        bootstrap, topic, group_id=f"billing-reprice-{report.run_id}", enable_auto_commit=False
    )
    await consumer.start()
    seen: set[str] = set()
    try:
        await consumer.seek_to_beginning()
        while True:
            polled = await consumer.getmany(timeout_ms=int(idle_seconds * 1000), max_records=batch)
            records = [r for part in polled.values() for r in part]
            if not records:
                return
            facts: dict[str, UsageRecorded] = {}
            for record in records:
                try:
                    fact = decode_recorded(record.value)
                except ValueError:
                    continue  # the pricer dead-letters these; nothing to re-rate
                report.scanned += 1
                if fact.request_id in seen:
                    continue  # a duplicate (a retried ingest, a re-sent spool): rated once
                if window.holds(fact, model_of(book, fact)):
                    seen.add(fact.request_id)
                    facts[fact.request_id] = fact
            if not facts:
                continue
            rows = await connection.fetch(
                "SELECT request_id, revision, total_cost FROM billing_transactions"
                " WHERE request_id = ANY($1::text[])",
                list(facts),
            )
            known = {r["request_id"]: Current(r["revision"], r["total_cost"]) for r in rows}
            report.not_billed += len(facts) - len(known)
            yield [(facts[request_id], current) for request_id, current in known.items()]
    finally:
        await consumer.stop()
