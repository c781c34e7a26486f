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
import gc
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from services.adapters import metrics
from services.adapters.database import create_pool
from services.adapters.kafka import make_consumer, make_producer
from services.adapters.offsets import stored_offsets
from services.adapters.partitions import (
    RetentionAction,
    create_partitions,
    months_ahead,
    retention_cutoff,
    retire,
)
from services.adapters.readmodels import PROJECTOR_CONSUMER
from services.adapters.topics import Topics, dead_letter_headers
from services.core.backoff import Backoff
from services.core.events import Position, UsagePriced, decode_priced
from services.projector.apply import apply_batch

log = logging.getLogger("billing.projector")

DEFAULT_TOPICS = Topics()
GROUP = "billing-projector"
MAINTENANCE_SECONDS = 3600.0
"""How often partitions are created ahead and old months retired (and once at start)."""
RETRYABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    TimeoutError,
    # Transient by nature: the batch's transaction rolled back whole, so running it again is
    # safe (a rebuild's swap or another owner of the partition can cause these).
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.LockNotAvailableError,
)


class _SeekToStored(ConsumerRebalanceListener):  # type: ignore[misc]
    """Position newly assigned partitions where PostgreSQL says we stopped.

    aiokafka starts fetching a newly assigned partition (from the group's Kafka commit, or
    the earliest offset) while this listener still reads PostgreSQL, and ``getmany`` may
    hand out those records before the seek. So only partitions in :attr:`positioned` may
    be applied: a partition enters it in the same step as its seek (no ``await`` between),
    and aiokafka drops whatever it buffered or has in flight for a partition that is
    seeked. Records of other partitions are dropped by the loop; the seek refetches them.
    """

    def __init__(self, consumer: AIOKafkaConsumer, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        self.consumer = consumer
        self.pool = pool
        self.stop = stop
        self.positioned: set[TopicPartition] = set()
        self.idle = asyncio.Event()
        """Set while no batch is being applied (its offsets are stored, or never will be)."""
        self.idle.set()

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self.positioned.difference_update(revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        # A batch still being applied would move the stored offsets after we read them.
        await self.idle.wait()
        stored = await self._stored({tp.topic for tp in assigned})
        if stored is None:
            return  # stopping: nothing more is applied
        for tp in assigned:
            # No stored offset: from the start (an offset below the log's start is reset to
            # the earliest one by aiokafka, auto_offset_reset="earliest").
            self.consumer.seek(tp, stored.get((tp.topic, tp.partition), 0))
        self.positioned.update(assigned)
        log.info("assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))

    async def _stored(self, topics: set[str]) -> dict[tuple[str, int], int] | None:
        """(topic, partition) → stored next offset; retried through database outages."""
        backoff = Backoff(0.2, 5.0)
        while not self.stop.is_set():
            try:
                stored: dict[tuple[str, int], int] = {}
                async with self.pool.acquire() as connection:
                    for topic in sorted(topics):
                        by_partition = await stored_offsets(connection, PROJECTOR_CONSUMER, topic)
                        stored.update(((topic, p), o) for p, o in by_partition.items())
                return stored
            except RETRYABLE as exc:
                delay = backoff.next()
                log.warning("reading stored offsets failed (%r); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
        return None


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
        pool = await _wait_for_pool(self.database_url, stop)
        if pool is None:
            return
        _tune_gc()
        consumer = make_consumer(
            self.bootstrap, group_id=self.group, max_poll_records=self.batch_max
        )
        listener = _SeekToStored(consumer, pool, stop)
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
                # Only what was fetched after the listener's seek (see _SeekToStored).
                positioned = listener.positioned
                records = [r for tp, batch in fetched.items() if tp in positioned for r in batch]
                if records:
                    listener.idle.clear()
                    try:
                        offsets = await self._handle(records, pool, producer, stop)
                    finally:
                        listener.idle.set()
                    await _mirror_offsets(consumer, offsets)
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
                await _dead_letter(producer, self.topics.dlq, record, reason)
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


async def _mirror_offsets(consumer: AIOKafkaConsumer, offsets: dict[tuple[str, int], int]) -> None:
    """Also commit to Kafka what PostgreSQL now holds (best effort).

    PostgreSQL's offsets are the truth (the listener seeks to them); this mirror makes the
    projector's lag visible to ordinary Kafka tooling.
    """
    try:
        await consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
    except KafkaError as exc:  # e.g. a rebalance in progress: the next batch commits again
        log.info("offset mirror to Kafka skipped: %r", exc)


async def _dead_letter(
    producer: AIOKafkaProducer, dlq: str, record: ConsumerRecord, reason: str
) -> None:
    log.warning(
        "dead-lettering %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason
    )
    headers = dead_letter_headers(record.topic, record.partition, record.offset, reason)
    await producer.send_and_wait(dlq, record.value, key=record.key, headers=headers)
    metrics.DEAD_LETTERED.labels(record.topic).inc()


def _tune_gc() -> None:
    """Fewer cyclic-GC passes: a batch allocates ~100k short-lived, acyclic objects.

    With the default threshold (700) the collector runs hundreds of times per batch and
    walks every object the process has loaded; measured, ~15% of the projector's CPU.
    Objects alive now (modules, schemas) are frozen out of later passes.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def _wait_for_pool(url: str, stop: asyncio.Event) -> asyncpg.Pool | None:
    """Connect, retrying while the database is still starting (or briefly away)."""
    backoff = Backoff(0.2, 5.0)
    while not stop.is_set():
        try:
            return await create_pool(url)
        except Exception as exc:  # DatabaseError wraps every connection failure
            log.warning("waiting for PostgreSQL: %s", exc)
            await asyncio.sleep(backoff.next())
    return None
