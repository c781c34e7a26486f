"""The pricer's batch logic: priced, held back without a price, or dead-lettered."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from services.core.events import Position, UsageCounts, UsageRecorded
from services.core.pricebook import InMemoryPriceBook
from services.core.usage import Usage
from services.pricer.logic import Incoming, price_batch

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)


def message(offset: int, value: bytes) -> Incoming:
    return Incoming(b"t1", value, Position("billing.usage.v1", 0, offset))


def recorded(request_id: str, model: str) -> bytes:
    usage = Usage(prompt_tokens=1000, uncached_input_tokens=1000, completion_tokens=100)
    return (
        UsageRecorded(
            request_id=request_id,
            tenant_id="t1",
            provider="openrouter",
            provider_model_id=model,
            occurred_at=NOW,
            recorded_at=NOW,
            usage=UsageCounts.of(usage),
        )
        .model_dump_json()
        .encode()
    )


def test_a_batch_is_sorted_into_priced_unpriced_and_dead(snapshot_book: InMemoryPriceBook) -> None:
    batch = [
        message(0, recorded("r1", "openai/gpt-5")),
        message(1, recorded("r2", "nobody/unknown-model")),
        message(2, b"{not json"),
        message(3, b'{"event_type": "UsageRecorded", "schema_version": 1, "request_id": "r4"}'),
        message(
            4, recorded("r5", "openai/gpt-5").replace(b'"prompt_tokens":1000', b'"prompt_tokens":5')
        ),
    ]
    outcome = price_batch(batch, snapshot_book, now=NOW)
    assert [p.request_id for p in outcome.priced] == ["r1"]
    priced = outcome.priced[0]
    assert priced.total_cost == Decimal("0.00225")  # 1,000 × $1.25/M + 100 × $10/M
    assert (priced.revision, priced.delta_cost, priced.previous_total_cost) == (
        1,
        Decimal("0.00225"),
        0,
    )
    assert [(u.request_id, "no price" in why) for u, why in outcome.unpriced] == [("r2", True)]
    dead = {m.position.offset: why for m, why in outcome.dead}
    assert set(dead) == {2, 3, 4}
    assert dead[2].startswith("undecodable")
    assert "tenant_id" in dead[3]
    assert "uncached_input_tokens" in dead[4]  # usage that does not add up is refused
