"""The quota rules (``services.core.quota``): budgets, worst-case costs, leases, alerts,
expiry and webhook signatures — pure functions, checked by example and by property."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.cost import compute_cost
from services.core.pricing import ModelPricing, Tier, parse_pricing
from services.core.quota import (
    DEFAULT_ALERTS,
    SIGNATURE_HEADER,
    Budget,
    BudgetError,
    Scope,
    alerts_of,
    balance_alert_id,
    balance_alerts,
    balance_scope,
    budget_alert_id,
    budget_of,
    budget_scope,
    expired_remainder,
    lease_free,
    period_label,
    reserved_prompt_tokens,
    thresholds_reached,
    webhook_signature,
    worst_case_cost,
)
from services.core.usage import Usage

D = Decimal
AT = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)

# -- budgets ---------------------------------------------------------------------------------


def test_a_valid_budget_keeps_what_was_given() -> None:
    assert budget_of("acme", "100.50") == Budget("acme", "", D("100.50"), True, DEFAULT_ALERTS)
    budget = budget_of("acme", 7, api_key_id="k1", hard=False, alerts="100, 50,80,50")
    assert budget == Budget("acme", "k1", D(7), False, (50, 80, 100))
    assert budget_of("acme", D("0"), api_key_id=None).api_key_id == ""
    assert budget_of("acme", " 12.000000001 ").monthly_limit == D("12.000000001")
    assert budget_of("acme", "999999999.999999999").monthly_limit == D("999999999.999999999")


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"tenant_id": ""}, "tenant_id"),
        ({"tenant_id": None}, "tenant_id"),
        ({"tenant_id": 5}, "tenant_id"),
        ({"monthly_limit": None}, "monthly_limit"),
        ({"monthly_limit": 1.5}, "monthly_limit"),  # floats never: money is decimal text
        ({"monthly_limit": True}, "monthly_limit"),
        ({"monthly_limit": "ten"}, "monthly_limit"),
        ({"monthly_limit": "-1"}, "monthly_limit"),
        ({"monthly_limit": "NaN"}, "monthly_limit"),
        ({"monthly_limit": "Infinity"}, "monthly_limit"),
        ({"monthly_limit": "1000000000"}, "monthly_limit"),
        ({"monthly_limit": "0.0000000001"}, "monthly_limit"),
        ({"api_key_id": 12}, "key_id"),
        ({"api_key_id": "k\x00"}, "key_id"),
        ({"api_key_id": "k" * 257}, "key_id"),
        ({"hard": "yes"}, "hard"),
        ({"hard": 1}, "hard"),
        ({"alerts": "50,abc"}, "alerts"),
        ({"alerts": [0]}, "alerts"),
        ({"alerts": [1001]}, "alerts"),
        ({"alerts": [True]}, "alerts"),
        ({"alerts": [50.0]}, "alerts"),
        ({"alerts": "50.5"}, "alerts"),
        ({"alerts": "-5"}, "alerts"),
        ({"alerts": 50}, "alerts"),
        ({"alerts": {50}}, "alerts"),
    ],
)
def test_an_invalid_budget_names_its_field(arguments: dict[str, object], field: str) -> None:
    values: dict[str, object] = {"tenant_id": "acme", "monthly_limit": "10"} | arguments
    tenant_id, monthly_limit = values.pop("tenant_id"), values.pop("monthly_limit")
    with pytest.raises(BudgetError) as raised:
        budget_of(tenant_id, monthly_limit, **values)
    assert raised.value.field == field
    assert raised.value.reason


def test_alert_thresholds_are_sorted_without_repeats() -> None:
    assert alerts_of(None) == DEFAULT_ALERTS == (50, 80, 100)
    assert alerts_of("") == alerts_of([]) == alerts_of(" , ") == ()
    assert alerts_of("90, 10 ,10") == (10, 90)
    assert alerts_of([1000, 1, "75"]) == (1, 75, 1000)
    assert alerts_of((100,)) == (100,)


# str.isdigit() is true for these, yet int("²") raises ValueError (and "٥٠" is no ASCII).
@pytest.mark.parametrize("value", ["²", ["50", "³"], "٥٠"])
def test_a_non_ascii_digit_is_a_budget_error_not_a_crash(value: object) -> None:
    with pytest.raises(BudgetError) as raised:
        alerts_of(value)
    assert raised.value.field == "alerts"


@given(st.lists(st.integers(min_value=1, max_value=1000), max_size=12))
def test_any_valid_thresholds_round_trip_as_text(thresholds: list[int]) -> None:
    expected = tuple(sorted(set(thresholds)))
    assert alerts_of(thresholds) == expected
    assert alerts_of(",".join(map(str, thresholds))) == expected


# -- scopes ----------------------------------------------------------------------------------


def test_scope_keys_name_the_balance_or_the_budget_month() -> None:
    assert balance_scope("acme").key == "balance/acme"
    assert Scope("balance", "acme").key == "balance/acme"
    assert budget_scope("acme", "k1", date(2026, 3, 1)).key == "budget/acme/k1/2026-03"
    assert budget_scope("acme", "", date(2026, 12, 1)).key == "budget/acme//2026-12"
    assert period_label(date(2027, 1, 1)) == "2027-01"
    assert budget_alert_id("acme", "", date(2026, 11, 1), 80) == "budget/acme//2026-11/80"
    assert balance_alert_id("acme", "BalanceLow", 7) == "BalanceLow/acme/after-grant-7"


# -- worst-case cost -------------------------------------------------------------------------


def test_worst_case_takes_the_dearest_input_and_output_prices_and_the_fee() -> None:
    pricing = parse_pricing(
        {
            "prompt": "0.000001",
            "completion": "0.000004",
            "request": "0.01",
            "input_cache_read": "0.0000001",
            "input_cache_write": "0.00000125",
            "input_cache_write_1h": "0.000002",
            "internal_reasoning": "0.000005",
        }
    )
    assert worst_case_cost(pricing, 1000, 100, AT) == (
        1000 * D("0.000002") + 100 * D("0.000005") + D("0.01")
    )
    plain = parse_pricing({"prompt": "0.000003", "completion": "0.000015"})
    assert worst_case_cost(plain, 10, 20, AT) == 10 * D("0.000003") + 20 * D("0.000015")
    assert worst_case_cost(plain, 0, 0, AT) == 0
    # A cache write dearer than the prompt is what an upstream may bill every token at.
    writes = parse_pricing(
        {"prompt": "0.000003", "completion": "0.000015", "input_cache_write": "0.00000375"}
    )
    assert worst_case_cost(writes, 100, 0, AT) == 100 * D("0.00000375")


def test_worst_case_uses_the_tier_the_prompt_size_selects() -> None:
    pricing = ModelPricing(
        prompt=D("0.000001"),
        completion=D("0.000002"),
        request=D("0.5"),
        tiers=(
            Tier({"prompt": D("0.000003"), "completion": D("0.000006")}, min_prompt_tokens=1000),
            Tier({"request": D("0")}, utc_start=2200, utc_end=600),  # night: no fee
        ),
    )
    assert worst_case_cost(pricing, 1000, 10, AT) == 1000 * D("0.000001") + 10 * D("0.000002") + D(
        "0.5"
    )
    assert worst_case_cost(pricing, 1001, 10, AT) == 1001 * D("0.000003") + 10 * D("0.000006") + D(
        "0.5"
    )
    night = datetime(2026, 11, 3, 23, 30, tzinfo=UTC)
    assert worst_case_cost(pricing, 1001, 10, night) == 1001 * D("0.000003") + 10 * D("0.000006")


def test_reserved_prompt_tokens_add_a_margin_and_slack() -> None:
    assert reserved_prompt_tokens(0) == 16
    assert reserved_prompt_tokens(100) == 141
    assert reserved_prompt_tokens(1) == 18  # ceil(1.25) + 16


PRICE = st.decimals(min_value=0, max_value=D("0.001"), places=9)
OPTIONAL_PRICE = st.none() | PRICE


@st.composite
def pricings(draw: st.DrawFn) -> ModelPricing:
    tier_prices = draw(
        st.dictionaries(
            st.sampled_from(["prompt", "completion", "input_cache_write", "request"]),
            PRICE,
            max_size=3,
        )
    )
    tiers: tuple[Tier, ...] = ()
    if tier_prices:
        tiers = (Tier(tier_prices, min_prompt_tokens=draw(st.integers(0, 5000))),)
    return ModelPricing(
        prompt=draw(PRICE),
        completion=draw(PRICE),
        request=draw(PRICE),
        internal_reasoning=draw(OPTIONAL_PRICE),
        input_cache_read=draw(OPTIONAL_PRICE),
        input_cache_write=draw(OPTIONAL_PRICE),
        input_cache_write_1h=draw(OPTIONAL_PRICE),
        tiers=tiers,
    )


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    prompt = draw(st.integers(0, 20_000))
    read = draw(st.integers(0, prompt))
    write = draw(st.integers(0, prompt - read))
    write_1h = draw(st.integers(0, prompt - read - write))
    completion = draw(st.integers(0, 5_000))
    return Usage(
        prompt_tokens=prompt,
        uncached_input_tokens=prompt - read - write - write_1h,
        cache_read_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=write_1h,
        completion_tokens=completion,
        reasoning_tokens=draw(st.integers(0, completion)),
    )


@settings(max_examples=300)
@given(pricings(), usages(), st.integers(0, 3000))
def test_no_usage_within_the_limits_costs_more_than_the_worst_case(
    pricing: ModelPricing, usage: Usage, spare_completion: int
) -> None:
    """The reservation bound: whatever split of the prompt (cache reads, writes, 1-hour
    writes) and of the completion (reasoning) an upstream reports, at most that many
    tokens never cost more than was reserved."""
    limit = usage.completion_tokens + spare_completion
    cost = compute_cost(usage, pricing, at=AT).total_cost
    assert cost <= worst_case_cost(pricing, usage.prompt_tokens, limit, AT)


# -- leases ----------------------------------------------------------------------------------

AMOUNT = st.decimals(min_value=0, max_value=D(10_000), places=6)


def test_lease_free_examples() -> None:
    assert lease_free(need=D(1), recent=D(0), available=D(0)) == 0
    assert lease_free(need=D(1), recent=D(0), available=D(-5)) == 0
    assert lease_free(need=D(1), recent=D(0), available=D(100)) == 8  # 8 requests' worth
    assert lease_free(need=D(1), recent=D(10), available=D(1000)) == 100  # 10 intervals
    assert lease_free(need=D(1), recent=D(1000), available=D(100)) == 50  # half at most
    assert lease_free(need=D(70), recent=D(0), available=D(100)) == 70  # unless it needs more
    assert lease_free(need=D(150), recent=D(0), available=D(100)) == 100  # never beyond


@settings(max_examples=500)
@given(need=AMOUNT, recent=AMOUNT, available=st.decimals(-100, 10_000, places=6))
def test_lease_free_bounds(need: Decimal, recent: Decimal, available: Decimal) -> None:
    free = lease_free(need=need, recent=recent, available=available)
    assert 0 <= free
    assert free <= max(available, D(0))  # never more than there is
    if available >= need:
        assert free >= need  # the waiting request fits
    if need <= available / 2:
        assert free <= available / 2  # another gateway is not starved


# -- alerts ----------------------------------------------------------------------------------


def test_thresholds_reached_examples() -> None:
    assert thresholds_reached(D(0), D(100), (50, 80, 100)) == []
    assert thresholds_reached(D(-5), D(0), (50,)) == []  # a refund is no spend
    assert thresholds_reached(D("49.999999999"), D(100), (50, 80, 100)) == []
    assert thresholds_reached(D(50), D(100), (50, 80, 100)) == [50]
    assert thresholds_reached(D("80.000000001"), D(100), (50, 80, 100)) == [50, 80]
    assert thresholds_reached(D(100), D(100), (50, 80, 100)) == [50, 80, 100]
    assert thresholds_reached(D("0.000000001"), D(0), (50, 80, 100)) == [50, 80, 100]
    assert thresholds_reached(D(250), D(100), (100, 200, 300)) == [100, 200]
    assert thresholds_reached(D(5), D(10), ()) == []


@given(
    spent=st.decimals(min_value=D("-1e6"), max_value=D("1e6"), places=9),
    limit=st.decimals(min_value=0, max_value=D("1e6"), places=9),
    thresholds=st.lists(st.integers(1, 1000), max_size=6, unique=True).map(sorted),
)
def test_thresholds_reached_is_exact(spent: Decimal, limit: Decimal, thresholds: list[int]) -> None:
    reached = thresholds_reached(spent, limit, thresholds)
    expected = [t for t in thresholds if spent > 0 and spent >= limit * t / 100]
    assert reached == expected


def test_balance_alerts_examples() -> None:
    low = D("0.1")
    assert balance_alerts(D(50), D(0), low) == []  # no grants: not prepaid
    assert balance_alerts(D(-50), D(0), low) == []
    assert balance_alerts(D("10.000000001"), D(100), low) == []
    assert balance_alerts(D(10), D(100), low) == ["BalanceLow"]
    assert balance_alerts(D("0.5"), D(100), low) == ["BalanceLow"]
    assert balance_alerts(D(0), D(100), low) == ["BalanceLow", "BalanceExhausted"]
    assert balance_alerts(D(-3), D(100), low) == ["BalanceLow", "BalanceExhausted"]
    assert balance_alerts(D(1), D(100), D(0)) == []
    assert balance_alerts(D(0), D(100), D(0)) == ["BalanceLow", "BalanceExhausted"]


@given(
    balance=st.decimals(min_value=-1000, max_value=1000, places=9),
    granted=st.decimals(min_value=D("0.000000001"), max_value=1000, places=9),
    fraction=st.decimals(min_value=0, max_value=1, places=3),
)
def test_balance_alerts_follow_their_definition(
    balance: Decimal, granted: Decimal, fraction: Decimal
) -> None:
    kinds = balance_alerts(balance, granted, fraction)
    assert ("BalanceLow" in kinds) == (balance <= granted * fraction)
    assert ("BalanceExhausted" in kinds) == (balance <= 0)


# -- expiry ----------------------------------------------------------------------------------


def test_expired_remainder_examples() -> None:
    # 30 expiring + 70 later, 12 spent: spending drew on the expiring grant first.
    assert expired_remainder(D(88), D(30), D(70)) == 18
    assert expired_remainder(D(100), D(30), D(70)) == 30  # untouched
    assert expired_remainder(D(60), D(30), D(70)) == 0  # used up, and part of the later ones
    assert expired_remainder(D(-5), D(30), D(0)) == 0  # overspent
    assert expired_remainder(D("0.000000001"), D(1), D(0)) == D("0.000000001")


@given(
    amount=st.decimals(min_value=D("0.000000001"), max_value=1000, places=9),
    later=st.decimals(min_value=0, max_value=1000, places=9),
    spent=st.decimals(min_value=0, max_value=3000, places=9),
)
def test_expired_remainder_is_what_first_expiring_spending_left(
    amount: Decimal, later: Decimal, spent: Decimal
) -> None:
    left = expired_remainder(amount + later - spent, amount, later)
    assert 0 <= left <= amount
    assert left == max(D(0), amount - spent)  # the expiring grant is drawn on first
    assert amount + later - spent - left == min(later, amount + later - spent)


# -- webhook signatures ------------------------------------------------------------------------


def test_webhook_signature_is_an_hmac_of_the_timestamp_and_body() -> None:
    body = b'{"event_type":"BalanceLow","alert_id":"x"}'
    mac = hmac.new(b"s3cret", b"1767225600." + body, hashlib.sha256).hexdigest()
    assert webhook_signature("s3cret", 1767225600, body) == f"t=1767225600,v1={mac}"
    assert webhook_signature("other", 1767225600, body) != f"t=1767225600,v1={mac}"
    assert webhook_signature("s3cret", 1767225601, body) != f"t=1767225600,v1={mac}"
    assert SIGNATURE_HEADER == "X-Billing-Signature"


def test_webhook_signature_of_a_known_vector() -> None:
    # HMAC-SHA256("key", "0.") — computed independently of the module under test.
    expected = hmac.new(b"key", b"0.", hashlib.sha256).hexdigest()
    assert webhook_signature("key", 0, b"") == f"t=0,v1={expected}"
    assert len(expected) == 64


@given(
    secret=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40),
    t=st.integers(0, 2**40),
    body=st.binary(),
)
def test_a_receiver_verifies_any_signature(secret: str, t: int, body: bytes) -> None:
    header = webhook_signature(secret, t, body)
    fields = dict(part.split("=", 1) for part in header.split(","))
    assert int(fields["t"]) == t
    mac = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256)
    assert hmac.compare_digest(fields["v1"], mac.hexdigest())
