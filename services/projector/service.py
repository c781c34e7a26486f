"""The projector process: consume ``billing.costs.v1`` in batches, apply each exactly once.

Exactly-once comes from PostgreSQL, not from Kafka: a batch's rows and its offsets commit in
one transaction, and on (re)assignment each partition is positioned at the offset stored
there. A database outage stalls the loop (the batch is retried with backoff) rather than
losing or skipping anything; undecodable messages go to the dead-letter topic first.
Between batches, at start and then hourly, it keeps the monthly partitions of
``billing_transactions`` ahead of time and retires months past the retention setting
(``services.adapters.partitions``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaProducer, ConsumerRecord

from services.adapters import metrics
from services.adapters.consuming import (
    RETRYABLE,
    SeekToStored,
    dead_letter,
    mirror_offsets,
    tune_gc,
    wait_for_pool,
)
from services.adapters.kafka import make_consumer, make_producer
from services.adapters.partitions import (
    RetentionAction,
    create_partitions,
    months_ahead,
    retention_cutoff,
    retire,
)
from services.adapters.readmodels import PROJECTOR_CONSUMER
from services.adapters.topics import Topics
from services.core.backoff import Backoff
from services.core.events import Position, UsagePriced, decode_priced
from services.projector.apply import apply_batch

log = logging.getLogger("billing.projector")

DEFAULT_TOPICS = Topics()
GROUP = "billing-projector"
MAINTENANCE_SECONDS = 3600.0
"""How often partitions are created ahead and old months retired (and once at start)."""


class Projector:
    def __init__(
        self,
        bootstrap: str,
        database_url: str,
        *,
        topics: Topics = DEFAULT_TOPICS,
        group: str = GROUP,
        batch_max: int = 5000,
        retry_max_seconds: float = 5.0,
        retention_months: int | None = None,
        retention_action: RetentionAction = "detach",
    ) -> None:
        self.bootstrap = bootstrap
        self.database_url = database_url
        self.topics = topics
        self.group = group
        self.batch_max = batch_max
        self.retry_max_seconds = retry_max_seconds
        self.retention_months = retention_months
        self.retention_action: RetentionAction = retention_action

    async def run(self, stop: asyncio.Event) -> None:
        pool = await wait_for_pool(self.database_url, stop)
        if pool is None:
            return
        tune_gc()
        consumer = make_consumer(
            self.bootstrap, group_id=self.group, max_poll_records=self.batch_max
        )
        listener = SeekToStored(consumer, pool, stop, PROJECTOR_CONSUMER)
        consumer.subscribe([self.topics.costs], listener=listener)
        producer = make_producer(self.bootstrap)
        await consumer.start()
        await producer.start()
        log.info("projecting %s into PostgreSQL", self.topics.costs)
        maintained = -MAINTENANCE_SECONDS
        try:
            while not stop.is_set():
                if time.monotonic() - maintained >= MAINTENANCE_SECONDS:
                    await self._maintain(pool)
                    maintained = time.monotonic()
                fetched = await consumer.getmany(timeout_ms=500, max_records=self.batch_max)
                # Only what was fetched after the listener's seek (see SeekToStored).
                positioned = listener.positioned
                records = [r for tp, batch in fetched.items() if tp in positioned for r in batch]
                if records:
                    listener.idle.clear()
                    try:
                        offsets = await self._handle(records, pool, producer, stop)
                    finally:
                        listener.idle.set()
                    await mirror_offsets(consumer, offsets)
        finally:
            await consumer.stop()
            await producer.stop()
            await pool.close()

    async def _maintain(self, pool: asyncpg.Pool) -> None:
        """Partitions ahead, old months retired; a failure is logged and tried next time."""
        now = datetime.now(UTC)
        try:
            async with pool.acquire() as connection:
                await create_partitions(connection, months_ahead(now))
                if self.retention_months is not None:
                    cutoff = retention_cutoff(now, self.retention_months)
                    await retire(connection, cutoff, self.retention_action)
        except (*RETRYABLE, asyncpg.PostgresError) as exc:
            log.warning("partition maintenance failed (%r); trying again later", exc)

    async def _handle(
        self,
        records: list[ConsumerRecord],
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        stop: asyncio.Event,
    ) -> dict[tuple[str, int], int]:
        """Apply one batch (retrying through database outages); return the offsets stored."""
        events: list[UsagePriced] = []
        positions: list[Position] = []
        offsets: dict[tuple[str, int], int] = {}
        for record in records:
            offsets[(record.topic, record.partition)] = record.offset + 1
            try:
                events.append(decode_priced(record.value))
                positions.append(Position(record.topic, record.partition, record.offset))
            except Exception as exc:  # decoding is pure: whatever it raises, the message is bad
                reason = f"undecodable UsagePriced: {exc}"[:1000]
                await dead_letter(producer, self.topics.dlq, record, reason)
        metrics.BATCH_SIZE.labels("projector").observe(len(records))
        backoff = Backoff(min(0.2, self.retry_max_seconds), self.retry_max_seconds)
        while True:
            started = time.perf_counter()
            try:
                async with pool.acquire() as connection:
                    result = await apply_batch(
                        connection, PROJECTOR_CONSUMER, events, offsets, positions
                    )
                break
            except RETRYABLE as exc:
                metrics.DB_RETRIES.inc()
                delay = backoff.next()
                log.warning("database unavailable (%r); retrying the batch in %.1fs", exc, delay)
                if stop.is_set():
                    raise
                await asyncio.sleep(delay)
        metrics.DB_WRITE_SECONDS.observe(time.perf_counter() - started)
        metrics.PROJECTED.inc(result.inserted + result.revised)
        metrics.DUPLICATES.inc(result.duplicates)
        metrics.RETIRED_SKIPPED.inc(result.retired)
        if result.retired:
            log.warning(
                "%d events of retired months not applied (their totals are frozen; the log "
                "keeps them)",
                result.retired,
            )
        if events:
            newest = max(e.recorded_at for e in events)
            metrics.PIPELINE_LAG.labels("projector").set(
                (datetime.now(UTC) - newest).total_seconds()
            )
        return offsets
