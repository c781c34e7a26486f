"""Issue #14: a lag that grows when nothing moves, and how fast a SIGKILLed service resumes.

``billing_pipeline_lag_seconds`` of the projector must rise while the pricer is down (usage
waits upstream of it) and fall once the pipeline moves again, whether the projector is in a
consumer group or takes every partition itself (``BILLING_CONSUMER_ASSIGNMENT=all``). A
restarted projector, quota service or pricer (run as ``billing up`` runs them: ``billing
projector``/``quota`` with ``all``, ``billing pricer``) must process a new record within
``RESUME_BOUND`` seconds of its start; the figures measured are printed in the run's
summary. Two projectors taking every partition still bill each event once (the batches are
fenced by the offsets stored in PostgreSQL).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest
from prometheus_client import REGISTRY

from services.adapters import metrics
from services.adapters.consuming import Assignment
from services.adapters.kafka import ensure_topics
from services.adapters.pricing_cache import PricingCache
from services.adapters.topics import Topics
from services.core.events import UsageRecorded
from services.core.pricebook import InMemoryPriceBook
from services.core.rating import rate
from services.pricer.loop import BatchPricer
from services.projector.service import GROUP, Projector
from tests.integration.pipeline import Pipeline, billed_totals, facts, produce, until
from tests.integration.test_projector_apply import T0, recorded

pytestmark = pytest.mark.integration

RESUME_BOUND = 3.0
"""Seconds from a restart to the first new record processed: the goal of issue #14. The
projector and the quota service reach it by joining no group (``all``: in a group, Tansu's
join after a SIGKILLed member takes 4.1 s at best, see ``consuming.RESTART_TIMINGS``).
Measured on 2 cores: projector and quota 0.4 s, pricer (in its group) 1.7 s."""
ALL: dict[str, str] = {"BILLING_CONSUMER_ASSIGNMENT": "all"}
"""How ``billing up`` runs the projector and the quota service."""


def fresh(items: list[UsageRecorded]) -> list[tuple[bytes, bytes]]:
    """``items`` recorded now (their lag is measured from ``recorded_at``)."""
    now = datetime.now(UTC)
    return [
        (
            i.tenant_id.encode(),
            i.model_copy(update={"occurred_at": now, "recorded_at": now})
            .model_dump_json()
            .encode(),
        )
        for i in items
    ]


def lag(service: str) -> float:
    value = REGISTRY.get_sample_value("billing_pipeline_lag_seconds", {"service": service})
    return float(value or 0.0)


@pytest.mark.parametrize("assignment", ["group", "all"])
async def test_projector_lag_grows_while_the_pricer_is_down_then_falls(
    kafka_bootstrap: str,
    topic_prefix: str,
    database_url: str,
    snapshot_book: InMemoryPriceBook,
    assignment: Assignment,
) -> None:
    topics = Topics.named(topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.partitions())
    stop = asyncio.Event()
    projector = Projector(
        kafka_bootstrap,
        database_url,
        topics=topics,
        group=f"{topic_prefix}{GROUP}",
        assignment=assignment,
    )
    running = asyncio.create_task(projector.run(stop))
    pricer = BatchPricer(
        kafka_bootstrap,
        topics=topics,
        group=f"{topic_prefix}billing-pricer",
        prices=PricingCache(snapshot_book, None),
        unpriced=None,
    )
    items = facts(30, seed=21)
    # The gauge is per process: forget what other tests' (old) events left in it.
    metrics.observe_handled("projector", datetime.now(UTC))
    try:
        # The pricer is down: usage arrives and waits upstream of the projector.
        await produce(kafka_bootstrap, topics.usage, fresh(items[:20]))  # type: ignore[arg-type]
        samples: list[float] = []
        for _ in range(10):
            await asyncio.sleep(0.5)
            samples.append(lag("projector"))
        assert samples[-1] >= 3.0, samples
        assert samples[-1] > samples[len(samples) // 2] > 0, samples  # it grows

        await pricer.start()  # the pipeline moves again
        await until(lambda: _count_at_least(database_url, 20), timeout=30)
        await produce(kafka_bootstrap, topics.usage, fresh(items[20:]))  # type: ignore[arg-type]
        await until(lambda: _count_at_least(database_url, 30), timeout=30)
        await asyncio.sleep(1.5)  # a tick of the watcher: nothing waits any more
        assert lag("projector") < 2.0, (samples, lag("projector"))
    finally:
        stop.set()
        await pricer.stop()
        await asyncio.wait_for(running, 20)


async def _count_at_least(database_url: str, count: int) -> bool:
    return await _transactions(database_url) >= count


async def _transactions(database_url: str) -> int:
    done, _, _ = await billed_totals(database_url)
    return done


async def _stored(database_url: str, consumer: str) -> int:
    """The sum of ``consumer``'s stored offsets: how many records it has consumed."""
    connection = await asyncpg.connect(database_url)
    try:
        stored = await connection.fetchval(
            "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE consumer = $1",
            consumer,
        )
        return int(stored)
    finally:
        await connection.close()


async def _resumed_after(
    pipeline: Pipeline,
    name: str,
    more: list[UsageRecorded],
    progress: Callable[[], Awaitable[int]],
    env: dict[str, str] | None = None,
) -> float:
    """SIGKILL ``name``, produce ``more``, restart it: seconds from its start until
    ``progress()`` moves."""
    pipeline.kill(name)
    before = await progress()
    await produce(pipeline.bootstrap, pipeline.topics.usage, fresh(more))  # type: ignore[arg-type]
    await asyncio.sleep(0.5)
    started = time.monotonic()
    pipeline.start(name, env=env)

    async def moved() -> bool:
        return await progress() > before

    await until(moved, timeout=60)
    return time.monotonic() - started


async def test_sigkilled_services_resume_within_the_bound(
    pipeline: Pipeline, report: Callable[[str], None]
) -> None:
    items = facts(400, seed=22)
    url = pipeline.database_url

    async def transactions() -> int:
        return await _transactions(url)

    async def charged() -> int:
        return await _stored(url, "quota")

    async def caught_up(count: int) -> None:
        await until(lambda: _count_at_least(url, count), timeout=60)
        await until(lambda: _at_least(charged, count), timeout=60)

    await produce(pipeline.bootstrap, pipeline.topics.usage, fresh(items[:100]))  # type: ignore[arg-type]
    pipeline.start("pricer")
    pipeline.start("projector", env=ALL)
    pipeline.start("quota", env=ALL)
    await caught_up(100)
    await asyncio.sleep(1)  # the pricer in its group, offsets committed

    projector = await _resumed_after(pipeline, "projector", items[100:200], transactions, ALL)
    await caught_up(200)
    quota = await _resumed_after(pipeline, "quota", items[200:300], charged, ALL)
    await caught_up(300)
    await asyncio.sleep(1)
    pricer = await _resumed_after(pipeline, "pricer", items[300:], transactions)
    await caught_up(400)
    report(
        f"resume after SIGKILL (start → first new record stored): projector {projector:.2f} s,"
        f" quota {quota:.2f} s (both BILLING_CONSUMER_ASSIGNMENT=all), pricer {pricer:.2f} s"
        f" (bound {RESUME_BOUND} s)"
    )
    assert projector <= RESUME_BOUND, f"projector resumed in {projector:.2f} s"
    assert quota <= RESUME_BOUND, f"quota service resumed in {quota:.2f} s"
    assert pricer <= RESUME_BOUND, f"pricer resumed in {pricer:.2f} s"


async def _at_least(progress: Callable[[], Awaitable[int]], count: int) -> bool:
    return await progress() >= count


async def test_two_projectors_taking_every_partition_bill_each_event_once(
    kafka_bootstrap: str, topic_prefix: str, database_url: str, snapshot_book: InMemoryPriceBook
) -> None:
    topics = Topics.named(topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.partitions())
    rng = random.Random(24)
    events = [rate(recorded(n, rng), snapshot_book, priced_at=T0) for n in range(600)]
    records = [(e.tenant_id.encode(), e.model_dump_json().encode()) for e in events]
    projected, duplicates = _counted()
    stop = asyncio.Event()
    projectors = [
        Projector(
            kafka_bootstrap,
            database_url,
            topics=topics,
            group=f"{topic_prefix}{GROUP}",
            batch_max=40,  # many small batches: the two race for the same records
            assignment="all",
        )
        for _ in range(2)
    ]
    running = [asyncio.create_task(p.run(stop)) for p in projectors]
    try:
        for start in range(0, len(records), 100):  # some arrive while both are reading
            await produce(kafka_bootstrap, topics.costs, records[start : start + 100])  # type: ignore[arg-type]
            await asyncio.sleep(0.2)
        await until(lambda: _at_least(lambda: _stored(database_url, "projector"), 600), 60)

        async def both_read_everything() -> bool:  # the second reader's, fenced or deduplicated
            return _counted()[1] - duplicates >= len(events)

        await until(both_read_everything, 60)
        count, rows, summary = await billed_totals(database_url)
        expected: dict[str, Decimal] = {}
        for event in events:
            expected[event.tenant_id] = expected.get(event.tenant_id, Decimal(0)) + event.total_cost
        assert count == len(events)
        assert rows == expected
        assert summary == expected
        assert await _stored(database_url, "projector") == len(events)
        # Both read every event; each was applied (inserted) once, and skipped once.
        assert _counted() == (projected + len(events), duplicates + len(events))
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*running), 20)


def _counted() -> tuple[float, float]:
    """(events projected, events skipped as already applied) by this process so far."""
    projected = REGISTRY.get_sample_value("billing_projected_events_total") or 0.0
    skipped = REGISTRY.get_sample_value("billing_duplicates_skipped_total") or 0.0
    return projected, skipped
