"""``billing reprice``: re-rate a window of history after a price correction.

Reads the usage facts of ``[since, until)`` — from PostgreSQL by default (it keeps every
billed fact, long after the broker's retention), or from the usage topic — prices each with
the price in effect at its ``occurred_at`` under the newest version, and, for every request
whose cost changes, emits a ``UsagePriced`` with the next revision, ``previous_total_cost``
and ``delta_cost`` to the cost topic. The projector applies it like any revision: the
transaction row changes, the summary moves by the delta, a ``billing_adjustments`` row
keeps request, revisions, old and new totals, delta and reason.

Idempotent: a request already at the newest price does not change, so running the same
re-rate again emits nothing, and live traffic priced after the correction is left alone.
One re-rate runs at a time (a PostgreSQL advisory lock), and a run waits until the
projector has applied what it emitted, so the next one starts from the applied state.
Every adjustment of a run carries the run's id in its reason.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any, Literal

import asyncpg

from services.adapters.errors import DatabaseError
from services.core.errors import PriceNotFound
from services.core.events import (
    ReportedCharge,
    UsageCounts,
    UsagePriced,
    UsageRecorded,
    decode_recorded,
)
from services.core.money import EXACT, fmt
from services.core.pricebook import PriceLookup
from services.core.rating import price, rate
from services.core.usage import Usage

_LOCK = 0x62696C6C_72707263  # "billrprc": one re-rate at a time
Source = Literal["db", "kafka"]
Progress = Callable[[int], None]
"""Told how many more facts were read."""
AppliedProgress = Callable[[int, int], None]
"""Told (applied, expected) while waiting for the projector."""


@dataclass(frozen=True, slots=True)
class Window:
    since: datetime
    until: datetime
    model: str | None = None
    """Only requests priced as this model (resolved through the price book's aliases)."""
    tenant: str | None = None

    def __post_init__(self) -> None:
        if self.since >= self.until:
            raise ValueError("--since must be before --until")

    def holds(self, fact: UsageRecorded, model: str | None) -> bool:
        return (
            self.since <= fact.occurred_at < self.until
            and (self.tenant is None or fact.tenant_id == self.tenant)
            and (self.model is None or model == self.model)
        )


@dataclass(frozen=True, slots=True)
class Current:
    """What the read model holds for a request now."""

    revision: int
    total_cost: Decimal


@dataclass(slots=True)
class Line:
    requests: int = 0
    old_total: Decimal = Decimal(0)
    new_total: Decimal = Decimal(0)

    @property
    def delta(self) -> Decimal:
        return self.new_total - self.old_total


@dataclass(slots=True)
class Report:
    """The diff per tenant × model, and what the run saw."""

    run_id: str
    lines: dict[tuple[str, str], Line] = field(default_factory=dict)
    scanned: int = 0
    unpriced: int = 0
    """Requests with no price at their time (left as they are)."""
    not_billed: int = 0
    """Usage facts (from the topic) with no transaction yet: the pricer will price them."""
    emitted: int = 0
    applied: int | None = None

    def add(self, tenant: str, model: str, old: Decimal, new: Decimal) -> None:
        line = self.lines.get((tenant, model))
        if line is None:
            line = self.lines[(tenant, model)] = Line()
        with localcontext(EXACT):
            line.requests += 1
            line.old_total += old
            line.new_total += new

    @property
    def changed(self) -> int:
        return sum(line.requests for line in self.lines.values())

    def rows(self) -> list[dict[str, str | int]]:
        return [
            {
                "tenant_id": tenant,
                "model": model,
                "requests_changed": line.requests,
                "old_total": fmt(line.old_total),
                "new_total": fmt(line.new_total),
                "delta": fmt(line.delta),
            }
            for (tenant, model), line in sorted(self.lines.items())
        ]

    def to_json(self) -> dict[str, Any]:
        with localcontext(EXACT):
            delta = sum((line.delta for line in self.lines.values()), Decimal(0))
        return {
            "run_id": self.run_id,
            "scanned": self.scanned,
            "changed": self.changed,
            "unpriced": self.unpriced,
            "not_billed": self.not_billed,
            "emitted": self.emitted,
            "applied": self.applied,
            "delta": fmt(delta),
            "diff": self.rows(),
        }

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(
            out,
            ["tenant_id", "model", "requests_changed", "old_total", "new_total", "delta"],
            lineterminator="\n",
        )
        writer.writeheader()
        writer.writerows(self.rows())
        return out.getvalue()

    def write(self, path: Path) -> None:
        """``.json`` → the whole report; anything else → the diff as CSV."""
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        else:
            path.write_text(self.to_csv())


def rerate(
    fact: UsageRecorded, current: Current, book: PriceLookup, priced_at: datetime, reason: str
) -> UsagePriced | None:
    """The next revision of ``fact`` at today's prices, or ``None`` when its cost is the
    same (raises ``PriceNotFound`` when it has no price at its time)."""
    priced = rate(
        fact,
        book,
        priced_at=priced_at,
        revision=current.revision + 1,
        previous_total=current.total_cost,
        reason=reason,
    )
    return None if priced.total_cost == current.total_cost else priced


# -- reading the facts ----------------------------------------------------------------------

_FACT_COLUMNS = (
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


def _where(window: Window) -> tuple[str, list[Any]]:
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
    where, args = _where(window)
    query = (
        f"SELECT {_FACT_COLUMNS} FROM billing_transactions"  # noqa: S608  # fixed columns
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
    """The rows whose cost differs at today's prices, as (fact, current): most rows of a
    window do not change, so each is priced from its columns first and becomes an event
    only when its total moves."""
    for row in rows:
        usage = Usage(*(row[c] for c in _COUNTS))
        try:
            _, breakdown = price(book, row["provider_model_id"], usage, row["occurred_at"])
        except PriceNotFound:
            report.unpriced += 1
            continue
        if breakdown.total_cost != row["total_cost"]:
            yield fact_of_row(row)


async def count_in_db(connection: asyncpg.Connection, window: Window) -> int:
    """How many transactions the window holds (the progress bar's length)."""
    where, args = _where(window)
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
                if window.holds(fact, _model_of(book, fact)):
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


def _model_of(book: PriceLookup, fact: UsageRecorded) -> str | None:
    try:
        return book.lookup(fact.provider_model_id, fact.occurred_at).model
    except PriceNotFound:
        return None


# -- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Broker:
    """The broker and topics a run reads (``--source kafka``) and emits to."""

    bootstrap: str
    usage_topic: str
    costs_topic: str


async def reprice(
    database_url: str,
    book: PriceLookup,
    window: Window,
    *,
    reason: str,
    broker: Broker | None,
    dry_run: bool,
    source: Source = "db",
    wait_seconds: float | None = 600.0,
    batch: int = 5_000,
    progress: Progress | None = None,
    applied_progress: AppliedProgress | None = None,
) -> Report:
    """Re-rate ``window``; a dry run emits nothing and needs no broker (from the database)."""
    from services.adapters.database import connect, init_connection
    from services.adapters.kafka import make_producer

    if broker is None and (source == "kafka" or not dry_run):
        raise DatabaseError("set BILLING_KAFKA_BOOTSTRAP: this re-rate reads or emits events")
    report = Report(run_id=uuid.uuid4().hex[:12])
    tagged = f"{reason} [reprice {report.run_id}]"
    connection = await connect(database_url)
    reader = await connect(database_url)  # the cursor's transaction stays apart from writes
    for opened in (connection, reader):
        await init_connection(opened)
    producer = None
    try:
        if not dry_run:
            if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK):
                raise DatabaseError("another billing reprice is running; try again when it ends")
            await _refuse_if_outstanding(connection)
            await connection.execute(
                "INSERT INTO reprice_runs (run_id, reason, since, until, model, tenant_id, source)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                report.run_id,
                tagged,
                window.since,
                window.until,
                window.model,
                window.tenant,
                source,
            )
            assert broker is not None  # noqa: S101  # checked above
            producer = make_producer(broker.bootstrap)
            await producer.start()
        if source == "db":
            chunks = facts_from_db(reader, window, batch)
        else:
            assert broker is not None  # noqa: S101  # checked above
            chunks = facts_from_topic(
                reader, broker.bootstrap, broker.usage_topic, window, book, report, batch
            )
        priced_at = datetime.now(UTC)
        async for chunk in chunks:
            if source == "db":
                report.scanned += len(chunk)
                pairs: Iterable[tuple[UsageRecorded, Current]] = changed_rows(chunk, book, report)
            else:
                pairs = chunk
            revised = _rerate_chunk(pairs, book, priced_at, tagged, report)
            if producer is not None and broker is not None and revised:
                await _send(producer, broker.costs_topic, revised)
                report.emitted += len(revised)
                await connection.execute(
                    "UPDATE reprice_runs SET emitted = $2 WHERE run_id = $1",
                    report.run_id,
                    report.emitted,
                )
            if progress is not None:
                progress(len(chunk))
        if producer is not None and report.emitted and wait_seconds:
            report.applied = await _wait_applied(
                connection, tagged, report.emitted, wait_seconds, applied_progress
            )
        if producer is not None and report.applied == report.emitted:
            await connection.execute(
                "UPDATE reprice_runs SET applied_at = now() WHERE run_id = $1", report.run_id
            )
    finally:
        if producer is not None:
            await producer.stop()
        await reader.close()
        await connection.close()  # also releases the advisory lock
    return report


async def _refuse_if_outstanding(connection: asyncpg.Connection) -> None:
    """Refuse while an earlier run's revisions are not all applied: this run would give
    the same requests the same revision numbers, and the projector keeps the first."""
    pending = await connection.fetch(
        "SELECT run_id, reason, emitted FROM reprice_runs WHERE applied_at IS NULL"
    )
    for run in pending:
        applied = await connection.fetchval(
            "SELECT count(*) FROM billing_adjustments WHERE reason = $1", run["reason"]
        )
        if applied < run["emitted"]:
            raise DatabaseError(
                f"reprice run {run['run_id']} has {run['emitted'] - applied} of "
                f"{run['emitted']} revisions not applied yet; wait until the projector has "
                "applied them (is it running?), then run again"
            )
        await connection.execute(
            "UPDATE reprice_runs SET applied_at = now() WHERE run_id = $1", run["run_id"]
        )


def _rerate_chunk(
    chunk: Iterable[tuple[UsageRecorded, Current]],
    book: PriceLookup,
    priced_at: datetime,
    reason: str,
    report: Report,
) -> list[UsagePriced]:
    revised: list[UsagePriced] = []
    for fact, current in chunk:
        try:
            priced = rerate(fact, current, book, priced_at, reason)
        except PriceNotFound:
            report.unpriced += 1
            continue
        if priced is not None:
            revised.append(priced)
            report.add(fact.tenant_id, priced.model, current.total_cost, priced.total_cost)
    return revised


async def _send(producer: Any, topic: str, events: Iterable[UsagePriced]) -> None:
    pending = [
        await producer.send(topic, e.model_dump_json().encode(), key=e.tenant_id.encode())
        for e in events
    ]
    await asyncio.gather(*pending)


async def _wait_applied(
    connection: asyncpg.Connection,
    reason: str,
    expected: int,
    timeout: float,
    progress: AppliedProgress | None,
) -> int:
    """Until the projector has booked an adjustment for every revision this run emitted."""
    deadline = time.monotonic() + timeout
    while True:
        applied = int(
            await connection.fetchval(
                "SELECT count(*) FROM billing_adjustments WHERE reason = $1", reason
            )
        )
        if progress is not None:
            progress(applied, expected)
        if applied >= expected or time.monotonic() > deadline:
            return applied
        await asyncio.sleep(0.5)
