"""The pipeline under faults: duplicates, SIGKILLed services, a vanished database, garbage.

The pricer and projector run as real processes (``billing pricer``, ``billing projector``)
against the session's broker and a fresh database; every test ends by checking that each
request was billed exactly once and the summary equals the transactions.
"""

from __future__ import annotations

import asyncio
import random
from urllib.parse import urlsplit, urlunsplit

import pytest

from services.adapters.kafka import make_consumer
from services.core.pricebook import InMemoryPriceBook
from tests.integration.pipeline import (
    FlakyProxy,
    Pipeline,
    billed_totals,
    expected_totals,
    facts,
    produce,
    wait_for_count,
)

pytestmark = pytest.mark.integration


def encoded(items: list, copies: int = 1, seed: int = 3) -> list[tuple[bytes, bytes]]:  # type: ignore[type-arg]
    values = [(i.tenant_id.encode(), i.model_dump_json().encode()) for i in items] * copies
    random.Random(seed).shuffle(values)
    return values


async def assert_exact(pipeline: Pipeline, items: list, book: InMemoryPriceBook) -> None:  # type: ignore[type-arg]
    count, rows, summary = await billed_totals(pipeline.database_url)
    assert count == len(items)
    assert rows == expected_totals(items, book)
    assert summary == rows


async def test_every_event_three_times_shuffled_is_billed_once(
    pipeline: Pipeline, snapshot_book: InMemoryPriceBook
) -> None:
    items = facts(400)
    await produce(pipeline.bootstrap, pipeline.topics.usage, encoded(items, copies=3))
    pipeline.start("pricer")
    pipeline.start("projector")
    await wait_for_count(pipeline, len(items))
    await asyncio.sleep(2)  # anything still in flight must not add to the totals
    await assert_exact(pipeline, items, snapshot_book)


async def test_pricer_and_projector_killed_mid_stream_lose_and_double_nothing(
    pipeline: Pipeline, snapshot_book: InMemoryPriceBook
) -> None:
    # Enough that both are still busy when the first rows show (each does >10k events/s),
    # and killed at the first sign of progress.
    items = facts(30_000, seed=9)
    await produce(pipeline.bootstrap, pipeline.topics.usage, encoded(items))
    pipeline.start("pricer")
    pipeline.start("projector")
    await wait_for_count(pipeline, 1)
    pipeline.kill("pricer")  # SIGKILL: no graceful commit, batches in flight
    pipeline.kill("projector")
    done, _, _ = await billed_totals(pipeline.database_url)
    assert done < len(items), "killed too late to prove anything"
    pipeline.start("pricer")
    pipeline.start("projector")
    await wait_for_count(pipeline, len(items), timeout=120)
    await asyncio.sleep(2)
    await assert_exact(pipeline, items, snapshot_book)


async def test_database_unreachable_for_ten_seconds_then_caught_up(
    pipeline: Pipeline, snapshot_book: InMemoryPriceBook
) -> None:
    parts = urlsplit(pipeline.database_url)
    if not parts.port:
        pytest.skip("the proxy needs a TCP database URL (this run uses a unix socket)")
    proxy = FlakyProxy(parts.hostname or "127.0.0.1", parts.port)
    await proxy.start()
    through_proxy = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    direct = pipeline.database_url
    first, second = facts(1500, seed=4)[:800], facts(1500, seed=4)[800:]
    await produce(pipeline.bootstrap, pipeline.topics.usage, encoded(first))
    pipeline.start("pricer")
    pipeline.database_url = through_proxy  # only the projector goes through the proxy
    pipeline.start("projector")
    pipeline.database_url = direct
    await wait_for_count(pipeline, 100)
    await proxy.cut()
    await produce(pipeline.bootstrap, pipeline.topics.usage, encoded(second))
    await asyncio.sleep(10)
    await proxy.start()  # same port: the projector reconnects by itself
    await wait_for_count(pipeline, 1500, timeout=120)
    await asyncio.sleep(2)
    await assert_exact(pipeline, first + second, snapshot_book)
    assert "retrying the batch" in pipeline.log("projector")
    await proxy.cut()


async def test_malformed_messages_on_every_topic_go_to_the_dlq(
    pipeline: Pipeline, snapshot_book: InMemoryPriceBook
) -> None:
    items = facts(200, seed=6)
    garbage = [
        (b"acme", b"\xff\xfe not json"),
        (b"acme", b'{"event_type": "UsageRecorded"}'),
        (b"acme", None),  # a tombstone
        (b"acme", b'{"event_type": [], "schema_version": []}'),
    ]
    await produce(pipeline.bootstrap, pipeline.topics.usage, garbage + encoded(items))
    await produce(pipeline.bootstrap, pipeline.topics.costs, [(b"acme", b"[1, 2")])
    pipeline.start("pricer")
    pipeline.start("projector")
    await wait_for_count(pipeline, len(items))
    await asyncio.sleep(2)
    await assert_exact(pipeline, items, snapshot_book)

    consumer = make_consumer(
        pipeline.bootstrap, pipeline.topics.dlq, group_id=f"{pipeline.prefix}dlq"
    )
    await consumer.start()
    sources: set[tuple[bytes, bytes]] = set()
    try:
        for _ in range(60):
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                for record in batch:
                    headers = dict(record.headers)
                    assert headers["reason"]
                    sources.add((headers["source-topic"], headers["source-offset"]))
            if len(sources) >= 5:
                break
    finally:
        await consumer.stop()
    assert {topic for topic, _ in sources} == {
        pipeline.topics.usage.encode(),
        pipeline.topics.costs.encode(),
    }
    assert len(sources) == 5
