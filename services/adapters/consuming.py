"""What every exactly-once consumer of this project shares (the projector, the quota service).

Exactly-once comes from PostgreSQL: a consumer writes a batch's effects and the offsets it
consumed in one transaction (``adapters/offsets.py``), and on (re)assignment positions each
partition where PostgreSQL says it stopped (:class:`SeekToStored`). Kafka's own commits are
only a mirror, for ordinary lag tooling (:func:`mirror_offsets`). Undecodable messages go to
the dead-letter topic with where they came from and why (:func:`dead_letter`).
:func:`consume_exactly_once` is the loop itself; a service gives it what to do with a
batch (:func:`priced_batch` decodes one, :func:`retried` applies it through outages).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from services.adapters import metrics
from services.adapters.database import create_pool
from services.adapters.kafka import make_consumer, make_producer
from services.adapters.offsets import stored_offsets
from services.adapters.topics import dead_letter_headers
from services.core.backoff import Backoff
from services.core.events import Position, UsagePriced, decode_priced

log = logging.getLogger("billing.consumer")

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


class SeekToStored(ConsumerRebalanceListener):  # type: ignore[misc]
    """Position newly assigned partitions where PostgreSQL says we stopped.

    aiokafka starts fetching a newly assigned partition (from the group's Kafka commit, or
    the earliest offset) while this listener still reads PostgreSQL, and ``getmany`` may
    hand out those records before the seek. So only partitions in :attr:`positioned` may
    be applied: a partition enters it in the same step as its seek (no ``await`` between),
    and aiokafka drops whatever it buffered or has in flight for a partition that is
    seeked. Records of other partitions are dropped by the loop; the seek refetches them.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        pool: asyncpg.Pool,
        stop: asyncio.Event,
        name: str,
    ) -> None:
        self.consumer = consumer
        self.name = name
        """Whose offsets (``consumer_offsets.consumer``)."""
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
                        by_partition = await stored_offsets(connection, self.name, topic)
                        stored.update(((topic, p), o) for p, o in by_partition.items())
                return stored
            except RETRYABLE as exc:
                delay = backoff.next()
                log.warning("reading stored offsets failed (%r); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
        return None


async def mirror_offsets(consumer: AIOKafkaConsumer, offsets: dict[tuple[str, int], int]) -> None:
    """Also commit to Kafka what PostgreSQL now holds (best effort).

    PostgreSQL's offsets are the truth (the listener seeks to them); this mirror makes the
    projector's lag visible to ordinary Kafka tooling.
    """
    try:
        await consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
    except KafkaError as exc:  # e.g. a rebalance in progress: the next batch commits again
        log.info("offset mirror to Kafka skipped: %r", exc)


async def dead_letter(
    producer: AIOKafkaProducer, dlq: str, record: ConsumerRecord, reason: str
) -> None:
    log.warning(
        "dead-lettering %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason
    )
    headers = dead_letter_headers(record.topic, record.partition, record.offset, reason)
    await producer.send_and_wait(dlq, record.value, key=record.key, headers=headers)
    metrics.DEAD_LETTERED.labels(record.topic).inc()


def tune_gc() -> None:
    """Fewer cyclic-GC passes: a batch allocates ~100k short-lived, acyclic objects.

    With the default threshold (700) the collector runs hundreds of times per batch and
    walks every object the process has loaded; measured, ~15% of the projector's CPU.
    Objects alive now (modules, schemas) are frozen out of later passes.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def wait_for_pool(url: str, stop: asyncio.Event) -> asyncpg.Pool | None:
    """Connect, retrying while the database is still starting (or briefly away)."""
    backoff = Backoff(0.2, 5.0)
    while not stop.is_set():
        try:
            return await create_pool(url)
        except Exception as exc:  # DatabaseError wraps every connection failure
            log.warning("waiting for PostgreSQL: %s", exc)
            await asyncio.sleep(backoff.next())
    return None


Offsets = dict[tuple[str, int], int]
Handle = Callable[[list[ConsumerRecord], AIOKafkaProducer], Awaitable[Offsets]]
"""Apply a batch of records exactly once; return the offsets stored with it."""
T = TypeVar("T")


async def consume_exactly_once(
    *,
    bootstrap: str,
    group: str,
    topic: str,
    name: str,
    pool: asyncpg.Pool,
    stop: asyncio.Event,
    handle: Handle,
    batch_max: int,
    maintain: Callable[[AIOKafkaProducer], Awaitable[None]] | None = None,
    maintenance_seconds: float = 3600.0,
) -> None:
    """Consume ``topic`` in ``group`` until ``stop``: each batch to ``handle`` (which stores
    its effects and offsets under ``name`` in one transaction), offsets mirrored to Kafka
    afterwards; ``maintain`` at start and every ``maintenance_seconds`` between batches."""
    consumer = make_consumer(bootstrap, group_id=group, max_poll_records=batch_max)
    listener = SeekToStored(consumer, pool, stop, name)
    consumer.subscribe([topic], listener=listener)
    producer = make_producer(bootstrap)
    await consumer.start()
    await producer.start()
    maintained = -maintenance_seconds
    try:
        while not stop.is_set():
            if maintain is not None and time.monotonic() - maintained >= maintenance_seconds:
                await maintain(producer)
                maintained = time.monotonic()
            fetched = await consumer.getmany(timeout_ms=500, max_records=batch_max)
            # Only what was fetched after the listener's seek (see SeekToStored).
            positioned = listener.positioned
            records = [r for tp, batch in fetched.items() if tp in positioned for r in batch]
            if not records:
                continue
            listener.idle.clear()
            try:
                offsets = await handle(records, producer)
            finally:
                listener.idle.set()
            await mirror_offsets(consumer, offsets)
    finally:
        await consumer.stop()
        await producer.stop()


@dataclass(slots=True)
class PricedBatch:
    """The ``UsagePriced`` events of a batch, where each sits, and the offsets it consumed
    (the undecodable ones included: they went to the dead-letter topic)."""

    events: list[UsagePriced] = field(default_factory=list)
    positions: list[Position] = field(default_factory=list)
    offsets: Offsets = field(default_factory=dict)


async def priced_batch(
    records: list[ConsumerRecord], producer: AIOKafkaProducer, dlq: str
) -> PricedBatch:
    """Decode ``billing.costs.v1`` records; dead-letter those that do not decode."""
    batch = PricedBatch()
    for record in records:
        batch.offsets[(record.topic, record.partition)] = record.offset + 1
        try:
            batch.events.append(decode_priced(record.value))
            batch.positions.append(Position(record.topic, record.partition, record.offset))
        except Exception as exc:  # decoding is pure: whatever it raises, the message is bad
            reason = f"undecodable UsagePriced: {exc}"[:1000]
            await dead_letter(producer, dlq, record, reason)
    return batch


async def retried(
    attempt: Callable[[], Awaitable[T]], stop: asyncio.Event, max_delay: float = 5.0
) -> T:
    """``attempt()`` until it gets through the database (a batch's transaction rolls back
    whole on failure, so running it again is safe); the last failure once ``stop`` is set."""
    backoff = Backoff(min(0.2, max_delay), max_delay)
    while True:
        try:
            return await attempt()
        except RETRYABLE as exc:
            metrics.DB_RETRIES.inc()
            delay = backoff.next()
            log.warning("database unavailable (%r); retrying the batch in %.1fs", exc, delay)
            if stop.is_set():
                raise
            await asyncio.sleep(delay)
