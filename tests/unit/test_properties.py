"""Property tests: the breakdown always adds up, cost is monotone, parsing never crashes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.cost import COMPONENTS, compute_cost
from services.core.errors import BillingError
from services.core.pricing import ModelPricing, Tier, parse_pricing
from services.core.quote import quote
from services.core.usage import Usage, parse_usage

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
counts = st.integers(min_value=0, max_value=2_000_000)
prices = st.decimals(min_value=0, max_value=Decimal("0.001"), places=12)


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    uncached, read, write, write_1h = draw(counts), draw(counts), draw(counts), draw(counts)
    completion = draw(counts)
    return Usage(
        prompt_tokens=uncached + read + write + write_1h,
        uncached_input_tokens=uncached,
        cache_read_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=write_1h,
        completion_tokens=completion,
        reasoning_tokens=draw(st.integers(min_value=0, max_value=completion)),
        web_search_requests=draw(st.integers(0, 20)),
        images=draw(st.integers(0, 20)),
        requests=draw(st.integers(0, 3)),
    )


@st.composite
def pricings(draw: st.DrawFn) -> ModelPricing:
    optional = st.one_of(st.none(), prices)
    base = ModelPricing(
        prompt=draw(prices),
        completion=draw(prices),
        request=draw(prices),
        image=draw(prices),
        web_search=draw(prices),
        internal_reasoning=draw(optional),
        input_cache_read=draw(optional),
        input_cache_write=draw(optional),
        input_cache_write_1h=draw(optional),
    )
    if draw(st.booleans()):
        # A long-context tier is never cheaper than the base price (as in every real catalogue).
        factor = draw(st.sampled_from([Decimal(1), Decimal("1.5"), Decimal(2)]))
        tier_prices = {"prompt": base.prompt * factor, "completion": base.completion * factor}
        threshold = draw(st.integers(0, 1_000_000))
        base = replace(base, tiers=(Tier(prices=tier_prices, min_prompt_tokens=threshold),))
    return base


GROWABLE = (
    "uncached_input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "web_search_requests",
    "images",
    "requests",
)


def grow(usage: Usage, field: str, by: int) -> Usage:
    """Grow one count, keeping the usage consistent (parts stay inside their totals)."""
    changes: dict[str, int] = {field: getattr(usage, field) + by}
    if field in GROWABLE[:4]:
        changes["prompt_tokens"] = usage.prompt_tokens + by
    if field == "reasoning_tokens":  # reasoning is part of completion
        changes["completion_tokens"] = usage.completion_tokens + by
    return usage._replace(**changes)


@given(usages(), pricings())
def test_components_sum_to_the_total(usage: Usage, pricing: ModelPricing) -> None:
    b = compute_cost(usage, pricing, at=AT)
    assert sum((getattr(b, c) for c in COMPONENTS), Decimal(0)) == b.total_cost
    assert b.total_cost >= 0


@given(usages(), pricings(), st.sampled_from(GROWABLE), st.integers(1, 500_000))
def test_the_total_never_decreases_when_a_count_grows(
    usage: Usage, pricing: ModelPricing, field: str, by: int
) -> None:
    before = compute_cost(usage, pricing, at=AT).total_cost
    after = compute_cost(grow(usage, field, by), pricing, at=AT).total_cost
    assert after >= before


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=True)
    | st.decimals(allow_nan=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=24), children, max_size=6)
    ),
    max_leaves=20,
)
usage_keys = st.sampled_from(
    [
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "prompt_tokens_details",
        "cached_tokens",
        "cache_write_tokens",
        "completion_tokens_details",
        "reasoning_tokens",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "cache_creation",
        "usageMetadata",
        "promptTokenCount",
        "thoughtsTokenCount",
        "cost",
        "is_byok",
        "usage",
    ]
)
usage_like = st.recursive(
    st.integers(-5, 10**7) | st.none() | st.text(max_size=4) | st.booleans(),
    lambda children: st.dictionaries(usage_keys, children, max_size=8),
    max_leaves=25,
)


@settings(max_examples=300)
@given(st.one_of(json_values, usage_like), st.sampled_from([None, "openai", "gemini", "anthropic"]))
def test_parsing_never_crashes_on_arbitrary_json(obj: Any, fmt: str | None) -> None:
    try:
        parsed = parse_usage(obj, fmt)
    except BillingError:
        return  # typed, and it names a field
    u = parsed.usage
    assert min(u.as_dict().values()) >= 0
    assert u.reasoning_tokens <= u.completion_tokens


@settings(max_examples=200)
@given(json_values)
def test_pricing_and_quote_requests_fail_only_with_typed_errors(obj: Any) -> None:
    try:
        parse_pricing(obj)
    except BillingError:
        pass
    book = _EmptyBook()
    try:
        quote(obj if isinstance(obj, dict) else {"provider_model_id": "x", "usage": obj}, book)
    except BillingError:
        pass


class _EmptyBook:
    def lookup(self, model: str, at: Any = None) -> Any:
        from services.core.errors import PriceNotFound

        raise PriceNotFound(model)
