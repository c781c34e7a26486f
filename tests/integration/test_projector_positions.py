"""The projector resumes every partition at the offset PostgreSQL holds, never before it.

aiokafka fetches a newly assigned partition (from the group's Kafka commit, or the start of
the log when the group has none) while the rebalance listener is still reading PostgreSQL;
whatever it fetched before the listener's seek must not be applied again.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest
from prometheus_client import REGISTRY

from services.adapters import consuming, offsets
from services.adapters.kafka import ensure_topics, make_producer
from services.adapters.topics import Topics
from services.core.events import UsagePriced
from services.core.pricebook import InMemoryPriceBook
from services.core.rating import rate
from services.projector.service import Projector
from tests.integration.pipeline import until
from tests.integration.test_projector_apply import T0, recorded

pytestmark = pytest.mark.integration


def duplicates() -> float:
    return REGISTRY.get_sample_value("billing_duplicates_skipped_total") or 0.0


async def send(bootstrap: str, topic: str, events: list[UsagePriced]) -> None:
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        for event in events:
            await producer.send(
                topic, event.model_dump_json().encode(), key=event.tenant_id.encode()
            )
        await producer.flush()
    finally:
        await producer.stop()


async def project_until(
    bootstrap: str, database_url: str, topics: Topics, group: str, rows: int
) -> None:
    """Run a projector until ``rows`` transactions exist and its offsets are stored."""
    stop = asyncio.Event()
    task = asyncio.create_task(
        Projector(bootstrap, database_url, topics=topics, group=group).run(stop)
    )
    connection = await asyncpg.connect(database_url)
    try:

        async def done() -> bool:
            count = await connection.fetchval("SELECT count(*) FROM billing_transactions")
            return bool(count == rows)

        await until(done)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await connection.close()


async def test_a_new_assignment_starts_at_the_stored_offsets_not_the_groups(
    kafka_bootstrap: str,
    topic_prefix: str,
    database_url: str,
    snapshot_book: InMemoryPriceBook,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topics = Topics.named(topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.partitions())
    rng = random.Random(11)
    events = [rate(recorded(n, rng), snapshot_book, priced_at=T0) for n in range(400)]
    await send(kafka_bootstrap, topics.costs, events[:300])
    await project_until(kafka_bootstrap, database_url, topics, f"{topic_prefix}first", 300)

    # A group with no Kafka commits (a renamed group, lost broker state): aiokafka starts
    # its partitions at the beginning of the log. The listener reads PostgreSQL slowly, so
    # those fetches arrive well before its seek.
    stored_offsets = offsets.stored_offsets

    async def slow_stored_offsets(*args: object) -> dict[int, int]:
        await asyncio.sleep(1.5)
        return await stored_offsets(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(consuming, "stored_offsets", slow_stored_offsets)
    await send(kafka_bootstrap, topics.costs, events[300:])
    before = duplicates()
    await project_until(kafka_bootstrap, database_url, topics, f"{topic_prefix}second", 400)

    assert duplicates() == before, "events below the stored offsets were fetched and re-applied"
    connection = await asyncpg.connect(database_url)
    try:
        total = await connection.fetchval("SELECT sum(total_cost) FROM billing_transactions")
        assert total == sum(e.total_cost for e in events)
        assert await connection.fetchval("SELECT sum(requests) FROM tenant_billing_summary") == len(
            events
        )
    finally:
        await connection.close()
