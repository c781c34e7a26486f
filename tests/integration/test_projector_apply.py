"""The projector's transaction against real PostgreSQL: exactly once, deltas exact."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from services.adapters.database import init_connection
from services.adapters.offsets import stored_offsets
from services.core.events import Position, UsageCounts, UsagePriced, UsageRecorded
from services.core.pricebook import InMemoryPriceBook
from services.core.pricing import parse_pricing
from services.core.rating import rate
from services.core.usage import parse_usage
from services.projector.apply import apply_batch

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
MODELS = ["anthropic/claude-sonnet-4.5", "openai/gpt-5", "google/gemini-2.5-flash"]


def recorded(n: int, rng: random.Random) -> UsageRecorded:
    prompt = rng.randint(10, 50_000)
    completion = rng.randint(1, 4_000)
    usage = parse_usage(
        {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": rng.randint(0, prompt)},
            "completion_tokens_details": {"reasoning_tokens": rng.randint(0, completion)},
        }
    ).usage
    return UsageRecorded(
        request_id=f"req-{n}",
        tenant_id=f"tenant-{n % 3}",
        api_key_id=f"key-{n % 2}",
        provider="openrouter",
        provider_model_id=MODELS[n % len(MODELS)],
        occurred_at=T0 + timedelta(hours=n % 40),
        recorded_at=T0 + timedelta(hours=n % 40, seconds=1),
        usage=UsageCounts.of(usage),
    )


async def fold(connection: asyncpg.Connection) -> dict[str, Decimal]:
    """Totals per tenant from the transactions and from the summary (they must agree)."""
    from_rows = await connection.fetch(
        "SELECT tenant_id, sum(total_cost) AS t, sum(requests) AS r, sum(prompt_tokens) AS p"
        " FROM billing_transactions GROUP BY tenant_id ORDER BY tenant_id"
    )
    from_summary = await connection.fetch(
        "SELECT tenant_id, sum(total_cost) AS t, sum(requests) AS r, sum(prompt_tokens) AS p"
        " FROM tenant_billing_summary GROUP BY tenant_id ORDER BY tenant_id"
    )
    assert [tuple(r) for r in from_rows] == [tuple(r) for r in from_summary]
    # The dashboard's minutes too: requests and spend per tenant and UTC minute.
    by_minute = await connection.fetch(
        "SELECT tenant_id, date_trunc('minute', occurred_at, 'UTC') AS m, count(*) AS r,"
        " sum(total_cost) AS t FROM billing_transactions GROUP BY 1, 2 ORDER BY 1, 2"
    )
    minutes = await connection.fetch(
        "SELECT tenant_id, minute AS m, requests AS r, total_cost AS t"
        " FROM billing_spend_minutes WHERE requests <> 0 OR total_cost <> 0 ORDER BY 1, 2"
    )
    assert [tuple(r) for r in by_minute] == [tuple(r) for r in minutes]
    return {r["tenant_id"]: r["t"] for r in from_rows}


async def test_triplicated_shuffled_batches_count_each_request_once(
    database_url: str, snapshot_book: InMemoryPriceBook
) -> None:
    rng = random.Random(7)
    facts = [recorded(n, rng) for n in range(300)]
    priced = [rate(f, snapshot_book, priced_at=T0) for f in facts]
    expected: dict[str, Decimal] = {}
    for event in priced:
        expected[event.tenant_id] = expected.get(event.tenant_id, Decimal(0)) + event.total_cost
    deliveries = priced * 3
    rng.shuffle(deliveries)

    connection = await asyncpg.connect(database_url)
    await init_connection(connection)
    try:
        inserted = duplicates = 0
        for start in range(0, len(deliveries), 128):
            batch = deliveries[start : start + 128]
            offsets = {("billing.costs.v1", 0): start + len(batch)}
            result = await apply_batch(connection, "projector", batch, offsets)
            inserted += result.inserted
            duplicates += result.duplicates
        assert inserted == 300
        assert duplicates == 600
        assert await fold(connection) == expected
        assert await stored_offsets(connection, "projector", "billing.costs.v1") == {0: 900}
        assert await connection.fetchval("SELECT count(*) FROM billing_transactions") == 300
    finally:
        await connection.close()


async def test_a_newer_revision_moves_the_summary_by_its_delta(
    database_url: str, snapshot_book: InMemoryPriceBook
) -> None:
    rng = random.Random(11)
    facts = [recorded(n, rng) for n in range(30)]
    first = [rate(f, snapshot_book, priced_at=T0) for f in facts]
    cheaper = InMemoryPriceBook()
    for model in snapshot_book.models():
        version = snapshot_book.lookup(model, T0)
        half = version.pricing.__class__(
            prompt=version.pricing.prompt / 2, completion=version.pricing.completion / 2
        )
        cheaper.record(model, half, effective_from=T0 - timedelta(days=365))
    second = [
        rate(f, cheaper, priced_at=T0, revision=2, previous_total=p.total_cost, reason="fix")
        for f, p in zip(facts, first, strict=True)
    ]
    connection = await asyncpg.connect(database_url)
    await init_connection(connection)
    try:
        await apply_batch(connection, "projector", first, {})
        result = await apply_batch(connection, "projector", [*second, *first], {})
        assert result.revised == 30 and result.inserted == 0
        again = await apply_batch(connection, "projector", second, {})
        assert again.revised == 0 and again.duplicates == 30
        totals = await fold(connection)
        expected: dict[str, Decimal] = {}
        for event in second:
            expected[event.tenant_id] = expected.get(event.tenant_id, Decimal(0)) + event.total_cost
        assert totals == expected
        rows = await connection.fetch("SELECT * FROM billing_adjustments ORDER BY id")
        assert len(rows) == 30
        assert all(r["delta_cost"] == r["new_total_cost"] - r["old_total_cost"] for r in rows)
        assert {r["reason"] for r in rows} == {"fix"}
    finally:
        await connection.close()


def test_events_round_trip_through_json(snapshot_book: InMemoryPriceBook) -> None:
    event = rate(recorded(1, random.Random(1)), snapshot_book, priced_at=T0)
    assert UsagePriced.model_validate_json(event.model_dump_json()) == event


async def test_two_projectors_applying_one_batch_at_once_count_it_once(
    database_url: str, snapshot_book: InMemoryPriceBook
) -> None:
    """A rebalance can leave an old and a new owner applying the same records: fenced."""
    rng = random.Random(21)
    events = [rate(recorded(n, rng), snapshot_book, priced_at=T0) for n in range(100)]
    positions = [Position("billing.costs.v1", 0, n) for n in range(100)]
    offsets = {("billing.costs.v1", 0): 100}
    first, second = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    for connection in (first, second):
        await init_connection(connection)
    try:
        results = await asyncio.gather(
            apply_batch(first, "projector", events, offsets, positions),
            apply_batch(second, "projector", events, offsets, positions),
        )
        assert sorted(r.inserted for r in results) == [0, 100]
        expected = sum((e.total_cost for e in events), Decimal(0))
        assert (
            await first.fetchval("SELECT sum(total_cost) FROM tenant_billing_summary") == expected
        )
        assert await first.fetchval("SELECT sum(requests) FROM tenant_billing_summary") == 100
    finally:
        await first.close()
        await second.close()


async def test_summary_sums_are_exact_with_thirty_place_prices(database_url: str) -> None:
    book = InMemoryPriceBook()
    price = parse_pricing({"prompt": "0.000000000000000000000000000007", "completion": "0.1"})
    for model in MODELS:
        book.record(model, price, effective_from=T0 - timedelta(days=1))
    rng = random.Random(8)
    events = [rate(recorded(n, rng), book, priced_at=T0) for n in range(60)]
    connection = await asyncpg.connect(database_url)
    await init_connection(connection)
    try:
        await apply_batch(connection, "projector", events, {})
        await fold(connection)  # transactions and summary agree to the last digit
    finally:
        await connection.close()
