"""What every exactly-once consumer of this project shares (the projector, the quota service).

Exactly-once comes from PostgreSQL: a consumer writes a batch's effects and the offsets it
consumed in one transaction (``adapters/offsets.py``), and on (re)assignment positions each
partition where PostgreSQL says it stopped (:class:`SeekToStored`). Kafka's own commits are
only a mirror, for ordinary lag tooling (:func:`mirror_offsets`). Undecodable messages go to
the dead-letter topic with where they came from and why (:func:`dead_letter`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Sequence

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from services.adapters import metrics
from services.adapters.database import create_pool
from services.adapters.offsets import stored_offsets
from services.adapters.topics import dead_letter_headers
from services.core.backoff import Backoff

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
