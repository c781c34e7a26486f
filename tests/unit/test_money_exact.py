"""Money is exact by construction: sums, differences and products never round, even past the
default context's 28 significant digits, wherever money is computed."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from services.core import money
from services.core.events import UsageCounts, UsageRecorded
from services.core.pricebook import InMemoryPriceBook
from services.core.pricing import ModelPricing
from services.core.quote import quote
from services.core.rating import rate
from services.core.usage import Usage

AT = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)

# Up to 9 integer digits and 30 places: up to 39 significant digits, well past the default 28.
amounts = st.decimals(
    min_value=Decimal("-999999999"), max_value=Decimal("999999999"), places=30
).filter(lambda d: d.is_finite())
tiny_prices = st.decimals(min_value=0, max_value=Decimal("0.001"), places=30)


def test_the_default_context_would_round_these() -> None:
    """The examples below are out of reach of plain Decimal arithmetic (the helpers' point)."""
    big, tiny = Decimal("1"), Decimal("0.000000000000000000000000000007")
    assert big + tiny != Decimal("1.000000000000000000000000000007")
    assert money.total([big, tiny]) == Decimal("1.000000000000000000000000000007")
    assert money.difference(big + 0, -tiny) == Decimal("1.000000000000000000000000000007")


@given(st.lists(amounts, max_size=20))
def test_total_is_the_exact_sum(values: list[Decimal]) -> None:
    assert Fraction(money.total(values)) == sum((Fraction(v) for v in values), Fraction(0))


@given(amounts, amounts)
def test_difference_is_exact(a: Decimal, b: Decimal) -> None:
    assert Fraction(money.difference(a, b)) == Fraction(a) - Fraction(b)


@given(tiny_prices, st.integers(0, 10**9))
def test_product_is_exact(price: Decimal, tokens: int) -> None:
    assert Fraction(money.product(price, tokens)) == Fraction(price) * tokens


def _recorded(prompt: int, completion: int) -> UsageRecorded:
    usage = Usage(prompt_tokens=prompt, uncached_input_tokens=prompt, completion_tokens=completion)
    return UsageRecorded(
        request_id="r1",
        tenant_id="t1",
        provider="openrouter",
        provider_model_id="acme/exact",
        occurred_at=AT,
        recorded_at=AT,
        usage=UsageCounts.of(usage),
    )


def _book(prompt: Decimal, completion: Decimal) -> InMemoryPriceBook:
    book = InMemoryPriceBook()
    pricing = ModelPricing(prompt=prompt, completion=completion)
    book.record("acme/exact", pricing, effective_from=datetime(2026, 1, 1, tzinfo=UTC))
    return book


@settings(max_examples=200)
@given(
    prompt_price=tiny_prices,
    completion_price=st.decimals(min_value=0, max_value=Decimal(1), places=30),
    prompt=st.integers(0, 2_000_000),
    completion=st.integers(0, 2_000_000),
    previous=st.decimals(min_value=0, max_value=Decimal("999999"), places=30),
)
def test_delta_cost_is_total_minus_previous_exactly(
    prompt_price: Decimal,
    completion_price: Decimal,
    prompt: int,
    completion: int,
    previous: Decimal,
) -> None:
    priced = rate(
        _recorded(prompt, completion),
        _book(prompt_price, completion_price),
        priced_at=AT,
        revision=2,
        previous_total=previous,
    )
    exact_total = Fraction(prompt_price) * prompt + Fraction(completion_price) * completion
    assert Fraction(priced.total_cost) == exact_total
    assert Fraction(priced.delta_cost) == exact_total - Fraction(previous)


def test_the_issue_example_goes_out_unrounded() -> None:
    """A total of 1.000000000000000000000000000007 after a previous total of 0."""
    priced = rate(
        _recorded(1, 1),
        _book(Decimal("0.000000000000000000000000000007"), Decimal(1)),
        priced_at=AT,
        revision=2,
        previous_total=Decimal(0),
    )
    assert priced.delta_cost == Decimal("1.000000000000000000000000000007")
    wire = priced.model_dump(mode="json")
    assert wire["delta_cost"] == "1.000000000000000000000000000007"


def test_quote_drift_is_exact() -> None:
    """The drift beside a reported cost is computed minus reported, unrounded."""
    answer = quote(
        {
            "provider_model_id": "acme/exact",
            "at": AT.isoformat(),
            "usage": {
                "prompt_tokens": 1,
                "completion_tokens": 1,
                "total_tokens": 2,
                "cost": "0.000000000000000000000000000001",
            },
        },
        _book(Decimal("0.000000000000000000000000000007"), Decimal(1)),
    )
    assert answer["breakdown"]["total_cost"] == "1.000000000000000000000000000007"
    assert answer["drift"] == "1.000000000000000000000000000006"


def test_reconciliation_tolerance_is_exact_past_28_digits() -> None:
    """1% of 100 is 1: a difference of 1.000…001 (33 digits) is off, exactly 1 is not."""
    from services.core.reconciliation import Line

    over = Line("m", Decimal("101.000000000000000000000000000001"), Decimal(100), Decimal(1))
    assert over.off and over.status == "OFF"
    at = Line("m", Decimal(101), Decimal(100), Decimal(1))
    assert not at.off
