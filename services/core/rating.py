"""Rating: turn a ``UsageRecorded`` fact into a ``UsagePriced`` fact (pure)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from services.core.cost import CostBreakdown, compute_cost
from services.core.events import Breakdown, UsagePriced, UsageRecorded
from services.core.money import difference
from services.core.pricebook import PriceLookup, PriceVersion
from services.core.usage import Usage


def rate(
    recorded: UsageRecorded,
    book: PriceLookup,
    *,
    priced_at: datetime,
    revision: int = 1,
    previous_total: Decimal = Decimal(0),
    reason: str = "priced",
) -> UsagePriced:
    """Price ``recorded`` with the price in effect when it occurred.

    Raises ``PriceNotFound`` when the model has no price then: the caller holds the event
    back rather than billing it at $0.
    """
    version, breakdown = price(
        book, recorded.provider_model_id, recorded.usage.to_usage(), recorded.occurred_at
    )
    tier = breakdown.tier
    return UsagePriced.model_construct(
        request_id=recorded.request_id,
        tenant_id=recorded.tenant_id,
        api_key_id=recorded.api_key_id,
        provider=recorded.provider,
        provider_model_id=recorded.provider_model_id,
        model=version.model,
        occurred_at=recorded.occurred_at,
        recorded_at=recorded.recorded_at,
        usage=recorded.usage,
        usage_source=recorded.usage_source,
        reported=recorded.reported,
        metadata=recorded.metadata,
        breakdown=Breakdown.of(breakdown),
        total_cost=breakdown.total_cost,
        currency="USD",
        price_version=version.version,
        pricing_tier=breakdown.to_json()["tier"] if tier is not None else None,
        revision=revision,
        priced_at=priced_at,
        previous_total_cost=previous_total,
        delta_cost=difference(breakdown.total_cost, previous_total),
        reason=reason,
        event_type="UsagePriced",
        schema_version=1,
    )


def price(
    book: PriceLookup, model: str, usage: Usage, occurred_at: datetime
) -> tuple[PriceVersion, CostBreakdown]:
    """The price version in effect for ``model`` at ``occurred_at`` and what ``usage`` costs
    under it (raises ``PriceNotFound``): the arithmetic of :func:`rate`, without the event."""
    version = book.lookup(model, occurred_at)
    breakdown = compute_cost(usage, version.pricing, at=occurred_at, price_version=version.version)
    return version, breakdown
