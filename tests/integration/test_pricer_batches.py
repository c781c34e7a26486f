"""The pricer's batch loop on the real broker and database, in-process.

Priced usage reaches the costs topic, usage with no price is held (topic and table, never
billed at $0), garbage is dead-lettered with where it came from, and a batch's offsets are
committed only once every output was acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.adapters.kafka import ensure_topics
from services.adapters.pricing_cache import PricingCache
from services.adapters.topics import Topics
from services.core.pricebook import InMemoryPriceBook
from services.pricer.logic import Outcome
from services.pricer.loop import BatchPricer
from services.pricer.unpriced import UnpricedStore
from tests.integration.pipeline import (
    BILLING,
    Pipeline,
    billed_totals,
    expected_totals,
    facts,
    produce,
    read_records,
    until,
    wait_for_count,
)

pytestmark = pytest.mark.integration

GARBAGE = [(b"acme", b"\xff not json"), (b"acme", b'{"event_type": "UsageRecorded"}')]


async def committed(bootstrap: str, group: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(6)]
        offsets = await admin.list_consumer_group_offsets(group, partitions=parts)
    finally:
        await admin.close()
    return sum(max(o.offset, 0) for o in offsets.values())


async def test_a_batch_is_priced_held_dead_lettered_then_committed(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, snapshot_book: InMemoryPriceBook
) -> None:
    topics = Topics.named(topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.partitions())
    items = facts(300, seed=5)
    unknown = items[0].model_copy(update={"request_id": "no-price", "provider_model_id": "x/y"})
    values = [(i.tenant_id.encode(), i.model_dump_json().encode()) for i in [*items, unknown]]
    await produce(kafka_bootstrap, topics.usage, [*GARBAGE, *values])
    group = f"{topic_prefix}pricer"
    store = UnpricedStore(database_url)
    pricer = BatchPricer(
        kafka_bootstrap,
        topics=topics,
        group=group,
        prices=PricingCache(snapshot_book, None),
        unpriced=store,
    )

    async def all_committed() -> bool:
        return await committed(kafka_bootstrap, group, topics.usage) == len(values) + 2

    await pricer.start()
    try:
        await until(all_committed)
    finally:
        await pricer.stop()
    costs = await read_records(kafka_bootstrap, topics.costs, len(items))
    assert sorted(json.loads(r.value)["request_id"] for r in costs) == sorted(
        i.request_id for i in items
    )
    held = await read_records(kafka_bootstrap, topics.unpriced, 1)
    assert [json.loads(r.value)["request_id"] for r in held] == ["no-price"]
    assert await store.count() == 1
    await store.close()
    dead = await read_records(kafka_bootstrap, topics.dlq, len(GARBAGE))
    sources = {dict(r.headers)["source-offset"] for r in dead}
    assert len(sources) == len(GARBAGE)
    assert {dict(r.headers)["source-topic"] for r in dead} == {topics.usage.encode()}


async def test_no_offset_is_committed_when_outputs_are_not_acknowledged(
    kafka_bootstrap: str, topic_prefix: str, snapshot_book: InMemoryPriceBook
) -> None:
    topics = Topics.named(topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.partitions())
    items = facts(200, seed=8)
    await produce(
        kafka_bootstrap,
        topics.usage,
        [(i.tenant_id.encode(), i.model_dump_json().encode()) for i in items],
    )
    group = f"{topic_prefix}pricer"
    failures: list[BaseException] = []
    pricer = BatchPricer(
        kafka_bootstrap,
        topics=topics,
        group=group,
        prices=PricingCache(snapshot_book, None),
        unpriced=None,
        on_error=failures.append,
    )

    async def broker_refuses(outcome: Outcome) -> None:  # noqa: ARG001
        raise TimeoutError("no acknowledgement")

    async def failed() -> bool:
        return bool(failures)

    pricer.send = broker_refuses  # type: ignore[method-assign]
    await pricer.start()
    try:
        await until(failed)
        await asyncio.sleep(1.0)  # a commit, if any were made, would have landed by now
    finally:
        await pricer.stop()
    assert isinstance(failures[0], TimeoutError)
    assert await committed(kafka_bootstrap, group, topics.usage) == 0


async def test_two_pricer_processes_share_the_work_and_bill_each_request_once(
    pipeline: Pipeline, snapshot_book: InMemoryPriceBook
) -> None:
    items = facts(3000, seed=11)
    values = [(i.tenant_id.encode(), i.model_dump_json().encode()) for i in items]
    await produce(pipeline.bootstrap, pipeline.topics.usage, values)
    pipeline.start("pricer")
    with (pipeline.workdir / "pricer-2.log").open("ab") as log:
        second = subprocess.Popen(  # noqa: S603 - our own console script
            [BILLING, "pricer"], env=pipeline.env(), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        pipeline.start("projector")
        await wait_for_count(pipeline, len(items), timeout=120)
        await asyncio.sleep(2)  # anything still in flight must not add to the totals
        count, rows, summary = await billed_totals(pipeline.database_url)
        assert count == len(items)
        assert rows == summary == expected_totals(items, snapshot_book)
        assert "assigned [(" in (pipeline.workdir / "pricer-2.log").read_text()
    finally:
        second.terminate()
        second.wait(20)
