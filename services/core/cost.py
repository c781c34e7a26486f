"""The cost rules: a pure function of (usage, prices) returning a breakdown in ``Decimal``.

Rules (checked against real OpenRouter charges):

* reasoning tokens are inside ``completion_tokens`` and are billed there once; only a
  distinct, non-zero ``internal_reasoning`` price re-prices them, and the breakdown then
  carries just the difference (which may be negative when reasoning is cheaper);
* cache reads and writes are parts of the prompt: reads at ``input_cache_read``, 5-minute
  writes at ``input_cache_write``, 1-hour writes at ``input_cache_write_1h`` (falling back to
  the 5-minute rate, then to the prompt rate, when the model lists no such price);
* ``request`` per call, ``web_search`` per search, ``image`` per image;
* an ``overrides`` tier applies when the prompt is strictly above its ``min_prompt_tokens``.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal, localcontext
from typing import Any, NamedTuple

from services.core.money import EXACT, ZERO, fmt
from services.core.pricing import ModelPricing, Tier
from services.core.usage import Usage

COMPONENTS = (
    "prompt_cost",
    "cache_read_cost",
    "cache_write_cost",
    "completion_cost",
    "internal_reasoning_cost",
    "request_cost",
    "web_search_cost",
    "image_cost",
)


class CostBreakdown(NamedTuple):
    """What one request costs, by component (a tuple: one is built per billed request)."""

    prompt_cost: Decimal
    cache_read_cost: Decimal
    cache_write_cost: Decimal
    completion_cost: Decimal
    internal_reasoning_cost: Decimal
    request_cost: Decimal
    web_search_cost: Decimal
    image_cost: Decimal
    total_cost: Decimal
    tier: Tier | None = None
    price_version: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Money as decimal strings; ``tier`` as the override's conditions (or null)."""
        return {
            "prompt_cost": fmt(self.prompt_cost),
            "cache_read_cost": fmt(self.cache_read_cost),
            "cache_write_cost": fmt(self.cache_write_cost),
            "completion_cost": fmt(self.completion_cost),
            "internal_reasoning_cost": fmt(self.internal_reasoning_cost),
            "request_cost": fmt(self.request_cost),
            "web_search_cost": fmt(self.web_search_cost),
            "image_cost": fmt(self.image_cost),
            "total_cost": fmt(self.total_cost),
            "tier": _tier_json(self.tier),
            "price_version": self.price_version,
        }


def _tier_json(tier: Tier | None) -> dict[str, int] | None:
    if tier is None:
        return None
    out = {}
    for key in ("min_prompt_tokens", "utc_start", "utc_end"):
        value = getattr(tier, key)
        if value is not None:
            out[key] = value
    return out


def compute_cost(
    usage: Usage,
    pricing: ModelPricing,
    *,
    at: datetime,
    price_version: int | None = None,
) -> CostBreakdown:
    """Price one request that happened at ``at`` (time-of-day tiers depend on it).

    Arithmetic runs in :data:`~services.core.money.EXACT`: nothing is rounded, ever.
    """
    prices, tier = (pricing, None)
    if pricing.tiers:
        prices, tier = pricing.for_request(usage.prompt_tokens, at)
    prompt_price = prices.prompt
    read_price = prices.input_cache_read if prices.input_cache_read is not None else prompt_price
    write_price = prices.input_cache_write if prices.input_cache_write is not None else prompt_price
    # A catalogue lists input_cache_write_1h only where the provider prices the 1-hour TTL
    # separately; elsewhere a 1-hour write costs what the default write does.
    write_1h_price = (
        prices.input_cache_write_1h if prices.input_cache_write_1h is not None else write_price
    )
    with localcontext(EXACT):
        prompt_cost = usage.uncached_input_tokens * prompt_price
        cache_read_cost = usage.cache_read_tokens * read_price if usage.cache_read_tokens else ZERO
        cache_write_cost = ZERO
        if usage.cache_write_tokens or usage.cache_write_1h_tokens:
            cache_write_cost = (
                usage.cache_write_tokens * write_price
                + usage.cache_write_1h_tokens * write_1h_price
            )
        completion_cost = usage.completion_tokens * prices.completion
        internal_reasoning_cost = ZERO
        reasoning_price = prices.internal_reasoning
        if usage.reasoning_tokens and reasoning_price and reasoning_price != prices.completion:
            internal_reasoning_cost = usage.reasoning_tokens * (reasoning_price - prices.completion)
        request_cost = usage.requests * prices.request if prices.request else ZERO
        web_search_cost = (
            usage.web_search_requests * prices.web_search if usage.web_search_requests else ZERO
        )
        image_cost = usage.images * prices.image if usage.images else ZERO
        total = (
            prompt_cost
            + cache_read_cost
            + cache_write_cost
            + completion_cost
            + internal_reasoning_cost
            + request_cost
            + web_search_cost
            + image_cost
        )
    return CostBreakdown(
        prompt_cost,
        cache_read_cost,
        cache_write_cost,
        completion_cost,
        internal_reasoning_cost,
        request_cost,
        web_search_cost,
        image_cost,
        total,
        tier,
        price_version,
    )
