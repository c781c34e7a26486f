"""The projector process loop against a real broker and database."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal

import asyncpg
import pytest

from services.adapters.kafka import ensure_topics, make_consumer, make_producer
from services.adapters.topics import Topics
from services.core.pricebook import InMemoryPriceBook
from services.core.rating import rate
from services.projector.service import Projector
from tests.integration.pipeline import until
from tests.integration.test_projector_apply import T0, recorded

pytestmark = pytest.mark.integration


async def test_projects_every_request_once_and_dead_letters_garbage(
    kafka_bootstrap: str, topic_prefix: str, database_url: str, snapshot_book: InMemoryPriceBook
) -> None:
    topics = Topics.named(topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.partitions())
    rng = random.Random(5)
    events = [rate(recorded(n, rng), snapshot_book, priced_at=T0) for n in range(200)]
    deliveries = events * 3
    rng.shuffle(deliveries)
    producer = make_producer(kafka_bootstrap)
    await producer.start()
    try:
        for event in deliveries:
            await producer.send(
                topics.costs, event.model_dump_json().encode(), key=event.tenant_id.encode()
            )
        await producer.send_and_wait(topics.costs, b"\x00 not an event", key=b"acme")
    finally:
        await producer.stop()

    stop = asyncio.Event()
    projector = Projector(kafka_bootstrap, database_url, topics=topics, group=f"{topic_prefix}proj")
    task = asyncio.create_task(projector.run(stop))
    connection = await asyncpg.connect(database_url)
    try:

        async def all_projected() -> bool:
            return bool(
                await connection.fetchval("SELECT count(*) FROM billing_transactions") == 200
            )

        await until(all_projected)
        expected = sum((e.total_cost for e in events), Decimal(0))
        assert (
            await connection.fetchval("SELECT sum(total_cost) FROM billing_transactions")
            == expected
        )
        assert (
            await connection.fetchval("SELECT sum(total_cost) FROM tenant_billing_summary")
            == expected
        )
        assert await connection.fetchval("SELECT sum(requests) FROM tenant_billing_summary") == 200

        async def offsets_cover_everything() -> bool:
            stored = await connection.fetchval(
                "SELECT sum(next_offset) FROM consumer_offsets WHERE topic = $1", topics.costs
            )
            return bool(stored == len(deliveries) + 1)

        await until(offsets_cover_everything)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await connection.close()

    dlq = make_consumer(kafka_bootstrap, topics.dlq, group_id=f"{topic_prefix}dlq-reader")
    await dlq.start()
    try:
        records = []
        for _ in range(50):
            for batch in (await dlq.getmany(timeout_ms=300)).values():
                records.extend(batch)
            if records:
                await asyncio.sleep(1)  # let any redelivered copy arrive too
                for batch in (await dlq.getmany(timeout_ms=300)).values():
                    records.extend(batch)
                break
    finally:
        await dlq.stop()
    # Dead letters are at-least-once (sent before the batch commits): one source position.
    sources = {
        (dict(r.headers)["source-partition"], dict(r.headers)["source-offset"]) for r in records
    }
    assert len(sources) == 1
    headers = dict(records[0].headers)
    assert headers["source-topic"] == topics.costs.encode()
    assert b"undecodable" in headers["reason"]
