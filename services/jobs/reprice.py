"""``billing reprice``: re-rate a window of history after a price correction (the I/O).

Reads the usage facts of ``[since, until)`` — from PostgreSQL by default (it keeps every
billed fact, long after the broker's retention), or from the usage topic — re-rates them
with ``services.core.rerating`` and emits each changed request's next revision to the cost
topic, where the projector applies it like any revision and books an adjustment. One
re-rate runs at a time (a PostgreSQL advisory lock); a run waits until the projector has
applied what it emitted, so the next one starts from the applied state. Every adjustment
of a run carries the run's id in its reason.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import asyncpg

from services.adapters.errors import DatabaseError
from services.adapters.publisher import KafkaPublisher
from services.core.events import (
    UsageRecorded,
)
from services.core.pricebook import PriceLookup
from services.core.rerating import Current, Report, Window, rerate_all
from services.jobs.reprice_sources import changed_rows, facts_from_db, facts_from_topic

_LOCK = 0x62696C6C_72707263  # "billrprc": one re-rate at a time
Source = Literal["db", "kafka"]
Progress = Callable[[int], None]
"""Told how many more facts were read."""
AppliedProgress = Callable[[int, int], None]
"""Told (applied, expected) while waiting for the projector."""
SEND_TIMEOUT_SECONDS = 60.0
"""A chunk of revisions not acknowledged by then fails the run (``PublishError``). The
chunk was already counted as emitted, so the next run refuses to start until the projector
has applied that many; revisions that never reached the log keep it refusing (see README)."""


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
            revised = rerate_all(pairs, book, priced_at, tagged, report)
            if producer is not None and broker is not None and revised:
                # Counted before sending: a chunk that fails may still reach the log (the
                # producer flushes on stop), and the next run must wait for it rather than
                # reuse its revision numbers (the projector would keep these, not its own).
                report.emitted += len(revised)
                await connection.execute(
                    "UPDATE reprice_runs SET emitted = $2 WHERE run_id = $1",
                    report.run_id,
                    report.emitted,
                )
                await KafkaPublisher(producer).publish(
                    broker.costs_topic, revised, SEND_TIMEOUT_SECONDS
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
