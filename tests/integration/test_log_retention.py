"""Retention of the s3 log against the real thing: weed mini, Tansu on it, PostgreSQL offsets
and a broker-committed group. What a sweep deletes is gone from the log's start, and nothing
any consumer still needs, nor any partition's last batch, is touched; Tansu goes on serving
the rest (from the earliest offset, at a trimmed offset, new produce, a restart)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from services.adapters.kafka import ensure_topics
from services.adapters.readmodels import REBUILD_LOCK
from services.local.broker import EmbeddedBroker
from services.local.logretention import LogRetention, Readers, positions_of
from services.local.objectstore import ObjectStore, load_or_create_credentials

pytestmark = pytest.mark.integration

RECORDS = 10  # per partition, one batch each


@pytest.fixture
def s3_broker(tmp_path: Path) -> Iterator[tuple[ObjectStore, EmbeddedBroker]]:
    credentials = load_or_create_credentials(tmp_path / "credentials.json")
    with ObjectStore(tmp_path / "objects", credentials, log_path=tmp_path / "weed.log") as store:
        broker = EmbeddedBroker(
            log_path=tmp_path / "tansu.log",
            storage="s3://tansu/",
            storage_env=store.s3_environment(),
        )
        with broker:
            yield store, broker


async def offsets_read(bootstrap: str, tp: TopicPartition) -> list[int]:
    """Every offset a consumer starting from the earliest one reads (until idle)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        seen: list[int] = []
        while fetched := await consumer.getmany(tp, timeout_ms=1500):
            seen += [record.offset for record in fetched[tp]]
        return seen
    finally:
        await consumer.stop()


async def test_a_sweep_trims_only_old_consumed_batches_and_tansu_serves_the_rest(
    s3_broker: tuple[ObjectStore, EmbeddedBroker], database_url: str
) -> None:
    store, broker = s3_broker
    bootstrap = broker.bootstrap
    usage, costs, dlq = "usage", "costs", "dlq"
    await ensure_topics(bootstrap, {usage: 2, costs: 2, dlq: 1})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, enable_idempotence=False)
    await producer.start()
    try:
        for topic, partitions in ((usage, 2), (costs, 2), (dlq, 1)):
            for partition in range(partitions):
                for n in range(RECORDS):
                    await producer.send_and_wait(topic, b"%d" % n, partition=partition)
    finally:
        await producer.stop()
    # Positions: the pricer's group has committed 6 on usage[0] and nothing on usage[1]; the
    # projector is at 4 and the quota service at 7 on costs[0].
    group = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id="pricer", enable_auto_commit=False
    )
    await group.start()
    group.assign([TopicPartition(usage, 0)])
    await group.commit({TopicPartition(usage, 0): OffsetAndMetadata(6, "")})
    await group.stop()
    connection = await asyncpg.connect(database_url)
    await connection.executemany(
        "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset)"
        " VALUES ($1, $2, $3, $4)",
        # costs[1]: the projector is at 8, the quota service has read nothing (no row)
        [("projector", costs, 0, 4), ("quota", costs, 0, 7), ("projector", costs, 1, 8)],
    )
    await connection.close()

    vacuums: list[None] = []  # weed compacts its volumes after a trim (not again for 2 min)
    retention = LogRetention(
        store.client(),
        store.bucket,
        timedelta(minutes=1),
        positions_of(
            database_url,
            bootstrap,
            {usage: Readers(groups=("pricer",)), costs: Readers(stored=("projector", "quota"))},
        ),
        echo=print,
        vacuum=lambda: vacuums.append(store.vacuum(garbage_threshold=0.01)),
        topics=[usage, costs, dlq],
        guarded=[usage, costs],
    )
    # While `billing rebuild` reads the log (its advisory lock), a sweep trims nothing.
    rebuild = await asyncpg.connect(database_url)
    assert await rebuild.fetchval("SELECT pg_try_advisory_lock($1)", REBUILD_LOCK)
    later = datetime.now(UTC) + timedelta(minutes=2)
    with pytest.raises(RuntimeError, match="a rebuild is reading the log"):
        await asyncio.to_thread(retention.sweep, later)
    await rebuild.close()
    # Not old yet: nothing goes. (A sweep is synchronous, as on the supervisor's thread.)
    assert (await asyncio.to_thread(retention.sweep)).trimmed == 0
    swept = await asyncio.to_thread(retention.sweep, later)
    assert swept.batches == 5 * RECORDS
    assert swept.trimmed == 6 + 4 + (RECORDS - 1)
    assert len(vacuums) == 1

    expected = {
        (usage, 0): list(range(6, RECORDS)),
        (usage, 1): list(range(RECORDS)),
        (costs, 0): list(range(4, RECORDS)),
        (costs, 1): list(range(RECORDS)),
        (dlq, 0): [RECORDS - 1],  # read by nobody in the stack: all but the last batch
    }
    for (topic, partition), offsets in expected.items():
        assert await offsets_read(bootstrap, TopicPartition(topic, partition)) == offsets

    # A fetch at a trimmed offset answers from the first batch left; produce goes on at the
    # log's end; the group's committed offset is untouched; a second sweep finds nothing.
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    tp = TopicPartition(usage, 0)
    consumer.assign([tp])
    consumer.seek(tp, 2)
    first = await asyncio.wait_for(consumer.getone(), 30)
    await consumer.stop()
    assert first.offset == 6
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    sent = await producer.send_and_wait(usage, b"new", partition=0)
    await producer.stop()
    assert sent.offset == RECORDS
    assert (await asyncio.to_thread(retention.sweep, later)).trimmed == 0
    assert len(vacuums) == 1
    check = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id="pricer")
    await check.start()
    check.assign([tp])
    assert await check.committed(tp) == 6
    await check.stop()

    # Tansu restarted on the trimmed log serves the same.
    broker.stop()
    broker.start()
    assert await offsets_read(bootstrap, tp) == [*range(6, RECORDS), RECORDS]
    assert await offsets_read(bootstrap, TopicPartition(costs, 0)) == list(range(4, RECORDS))
