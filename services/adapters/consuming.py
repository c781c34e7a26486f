"""What every exactly-once consumer of this project shares (the projector, the quota service).

Exactly-once comes from PostgreSQL: a consumer writes a batch's effects and the offsets it
consumed in one transaction (``adapters/offsets.py``), and on (re)assignment positions each
partition where PostgreSQL says it stopped (:class:`SeekToStored`). Kafka's own commits are
only a mirror, for ordinary lag tooling (:func:`mirror_offsets`). Partitions come from a
consumer group, or (:data:`Assignment` ``all``) a process takes every partition itself and
joins no group, so a restart after a crash waits for no group to settle. Undecodable messages go to
the dead-letter topic with where they came from and why (:func:`dead_letter`).
:func:`consume_exactly_once` is the loop itself; a service gives it what to do with a
batch (:func:`priced_batch` decodes one, :func:`retried` applies it through outages).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from services.adapters import metrics
from services.adapters.database import create_pool
from services.adapters.kafka import make_admin, make_consumer, make_producer
from services.adapters.offsets import stored_offsets
from services.adapters.topics import Topics, dead_letter_headers
from services.core.backoff import Backoff
from services.core.events import Position, UsagePriced, decode_priced, undecodable_reason

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
        self._seek(assigned, stored)
        self.positioned.update(assigned)
        log.info("assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))

    async def take_all(self, topic: str) -> bool:
        """Without a group (``all``): assign every partition of ``topic`` the consumer's
        metadata shows, each at its stored offset, when some are not yet; whether any is.

        Called between batches (so the stored offsets are those of every batch applied).
        ``assign`` forgets all positions, so every partition is positioned again.
        """
        found = {TopicPartition(topic, p) for p in self.consumer.partitions_for_topic(topic) or ()}
        if found <= self.positioned:
            return bool(self.positioned)
        stored = await self._stored({topic})
        if stored is None:
            return False
        self.consumer.assign(sorted(found))
        self._seek(found, stored)  # in the same step as the assignment: nothing fetched between
        self.positioned = found
        log.info("took all of %s: partitions %s", topic, sorted(tp.partition for tp in found))
        return True

    def _seek(
        self, partitions: Iterable[TopicPartition], stored: dict[tuple[str, int], int]
    ) -> None:
        for tp in partitions:
            # No stored offset: from the start (an offset below the log's start is reset to
            # the earliest one by aiokafka, auto_offset_reset="earliest").
            self.consumer.seek(tp, stored.get((tp.topic, tp.partition), 0))

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
    projector's lag visible to ordinary Kafka tooling (and to :func:`watch_lag`). Without a
    group (``all``) it commits as no member (generation -1): accepted by Tansu 0.6.0 and
    Kafka while no member of the group is alive, refused (and skipped) while one is.
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


PRICER_GROUP = "billing-pricer"
"""The pricer's consumer group (after the topic prefix): the projector and the quota
service watch what waits for it (:func:`watch_lag`)."""


def watched_downstream(topics: Topics, group: str, own_suffix: str) -> list[tuple[str, str]]:
    """What a cost consumer's lag watches: the costs topic for its ``group`` and, upstream,
    the usage topic for the pricer's group, named like ``group`` (the prefix before
    ``own_suffix``)."""
    watched = [(topics.costs, group)]
    if group.endswith(own_suffix):
        watched.append((topics.usage, group.removesuffix(own_suffix) + PRICER_GROUP))
    return watched


async def watch_lag(
    service: str,
    bootstrap: str,
    watched: Sequence[tuple[str, str]],
    stop: asyncio.Event,
    interval: float = 1.0,
) -> None:
    """Every ``interval``, the age of the oldest event waiting for ``service`` into
    ``billing_pipeline_lag_seconds`` (``metrics.observe_waiting``), until ``stop``.

    ``watched`` is (topic, consumer group) pairs: the service's own input and what is
    upstream of it. Per partition, the record at the group's committed offset is fetched
    by a group-less consumer: if there is one, it waits, and its age is now minus its
    ``recorded_at`` (or its broker timestamp when it does not parse). End offsets are not
    used: Tansu under-reports them (``adapters/kafka.py``). One offset fetch per group and
    one fetch per tick, so it is cheap. A failed tick is logged and tried again; clients
    that cannot start (a broker away) are made again after a pause, so the watch never
    ends before ``stop``; the partitions are listed again every ``_RELIST_TICKS`` ticks.
    """
    backoff = Backoff(0.5, 10.0)
    while not stop.is_set():
        try:
            await _watch(service, bootstrap, watched, stop, interval)
        except (KafkaError, OSError, TimeoutError) as exc:
            log.info("lag watch could not start: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff.next())


_RELIST_TICKS = 60


async def _watch(
    service: str,
    bootstrap: str,
    watched: Sequence[tuple[str, str]],
    stop: asyncio.Event,
    interval: float,
) -> None:
    """:func:`watch_lag` with one pair of clients, until ``stop`` (or they cannot start)."""
    admin = make_admin(bootstrap, request_timeout_ms=5000)
    probe = make_consumer(
        bootstrap,
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=64 * 1024,  # the first record per partition is all it reads
    )
    try:
        await admin.start()
        await probe.start()
        ticks = 0
        while not stop.is_set():
            if ticks % _RELIST_TICKS == 0:
                await _assign_watched(probe, watched)
            ticks += 1
            try:
                age = await _oldest_waiting(admin, probe, watched)
                metrics.observe_waiting(service, age)
            except (KafkaError, OSError, TimeoutError) as exc:
                log.info("lag watch skipped a tick: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    finally:
        await probe.stop()
        await admin.close()


async def _assign_watched(probe: AIOKafkaConsumer, watched: Sequence[tuple[str, str]]) -> None:
    """Every partition of the watched topics (again only when they changed)."""
    await probe.topics()  # every topic's metadata (never a named, missing one)
    partitions = {
        TopicPartition(topic, p)
        for topic, _ in watched
        for p in probe.partitions_for_topic(topic) or ()
    }
    if partitions != probe.assignment():
        probe.assign(sorted(partitions))


async def _oldest_waiting(
    admin: AIOKafkaAdminClient, probe: AIOKafkaConsumer, watched: Sequence[tuple[str, str]]
) -> float:
    """Seconds since the oldest watched event was recorded (0: nothing waits)."""
    assigned = probe.assignment()
    if not assigned:
        return 0.0
    for topic, group in watched:
        mine = [tp for tp in assigned if tp.topic == topic]
        committed = await admin.list_consumer_group_offsets(group, partitions=mine)
        for tp in mine:
            meta = committed.get(tp)
            if meta is None or meta.offset < 0:
                await probe.seek_to_beginning(tp)
            else:
                probe.seek(tp, meta.offset)
    # Every partition's first records (up to 64 KiB each): the first is the one waiting; a
    # partition that did not answer within the 0.3 s counts at the next tick. Paused in
    # between: aiokafka would otherwise keep fetching ahead into its buffers all along.
    probe.resume(*assigned)
    try:
        fetched = await probe.getmany(timeout_ms=300)
    finally:
        probe.pause(*assigned)
    now = time.time()
    ages = [now - _recorded_at(records[0]) for records in fetched.values() if records]
    return max(0.0, *ages)


def _recorded_at(record: ConsumerRecord) -> float:
    """The record's ``recorded_at`` (unix seconds), else when the broker got it."""
    try:
        text = json.loads(record.value)["recorded_at"]
        return datetime.fromisoformat(text).timestamp()
    except Exception:  # any record at all may sit there, garbage included
        return float(record.timestamp) / 1000.0


RESTART_TIMINGS = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 300}
"""Group timings of the exactly-once consumers, shorter than ``kafka.GROUP_TIMINGS``: a
restarted member waits for its SIGKILLed predecessor's session to expire. Measured on
Tansu 0.6.0 (a lone member SIGKILLed, a new one started at once): assigned after 11.1 s
with session 6 s, 7.1 s with 3 s, 4.1 s with 2 s or 1.5 s (its floor); first join 3.0 s
with 6 s, 1.0 s with 2 s; static membership (``group_instance_id``) made both 6.0 s. An
eviction (a loop stalled over 2 s) costs only a rebalance here: batches are fenced by the
offsets stored in PostgreSQL."""

Assignment = Literal["group", "all"]
"""How an exactly-once consumer gets its partitions (``settings.consumer_assignment``)."""
PARTITIONS_CHECK_MS = 5000
"""Without a group, how often the topic's metadata is refreshed: a topic created after the
start, or partitions added to it, are taken within this (``metadata_max_age_ms``)."""

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
    lag: tuple[str, Sequence[tuple[str, str]]] | None = None,
    assignment: Assignment = "group",
) -> None:
    """Consume ``topic`` in ``group`` until ``stop``: each batch to ``handle`` (which stores
    its effects and offsets under ``name`` in one transaction), offsets mirrored to Kafka
    afterwards; ``maintain`` at start and every ``maintenance_seconds`` between batches;
    with ``lag`` (service, watched (topic, group) pairs), :func:`watch_lag` beside it.

    With ``assignment="all"`` every partition of ``topic`` is read without joining
    ``group`` (only its committed offsets are mirrored there): two such processes both
    read everything, and the stored offsets fence each batch, so each record still
    counts once."""
    options = (
        RESTART_TIMINGS if assignment == "group" else {"metadata_max_age_ms": PARTITIONS_CHECK_MS}
    )
    consumer = make_consumer(bootstrap, group_id=group, max_poll_records=batch_max, **options)
    listener = SeekToStored(consumer, pool, stop, name)
    if assignment == "group":
        consumer.subscribe([topic], listener=listener)
    producer = make_producer(bootstrap)
    watcher = None
    try:
        await consumer.start()
        await producer.start()
        if lag is not None:
            watcher = asyncio.create_task(watch_lag(lag[0], bootstrap, lag[1], stop))
        maintained = -maintenance_seconds
        while not stop.is_set():
            if maintain is not None and time.monotonic() - maintained >= maintenance_seconds:
                await maintain(producer)
                maintained = time.monotonic()
            if assignment == "all" and not await listener.take_all(topic):
                with contextlib.suppress(TimeoutError):  # no such topic yet
                    await asyncio.wait_for(stop.wait(), 0.5)
                continue
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
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
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
            reason = undecodable_reason(exc, "UsagePriced")
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
