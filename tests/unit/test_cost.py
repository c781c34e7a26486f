"""The cost rules, each checked against a figure computed by hand from documented prices."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from services.core.cost import COMPONENTS, compute_cost
from services.core.pricing import parse_pricing
from services.core.usage import Usage, parse_usage

D = Decimal
AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

# Claude Sonnet 4.5 as published: $3 / $15 per M, cache read $0.30, 5m write $3.75, 1h write $6,
# and 2x above 200k prompt tokens.
SONNET = parse_pricing(
    {
        "prompt": "0.000003",
        "completion": "0.000015",
        "input_cache_read": "0.0000003",
        "input_cache_write": "0.00000375",
        "input_cache_write_1h": "0.000006",
        "web_search": "0.01",
        "overrides": [
            {
                "min_prompt_tokens": 200000,
                "prompt": "0.000006",
                "completion": "0.0000225",
                "input_cache_read": "0.0000006",
                "input_cache_write": "0.0000075",
                "input_cache_write_1h": "0.000012",
            }
        ],
    }
)


def test_original_design_example() -> None:
    """claude-4.5-sonnet: 1,800 prompt (600 cached), 320 completion of which 24 reasoning.

    1,200 × $3/M + 600 × $0.30/M + 320 × $15/M = 0.0036 + 0.00018 + 0.0048 = $0.00858.
    The original formula (prompt + cached + completion + reasoning) gave $0.01074.
    """
    usage = parse_usage(
        {
            "usage": {
                "prompt_tokens": 1800,
                "completion_tokens": 320,
                "prompt_tokens_details": {"cached_tokens": 600},
                "completion_tokens_details": {"reasoning_tokens": 24},
            }
        }
    ).usage
    b = compute_cost(usage, SONNET, at=AT)
    assert b.prompt_cost == D("0.0036")
    assert b.cache_read_cost == D("0.00018")
    assert b.completion_cost == D("0.0048")
    assert b.internal_reasoning_cost == 0
    assert b.total_cost == D("0.00858")
    assert b.tier is None


def test_reasoning_is_not_double_counted() -> None:
    with_reasoning = Usage(prompt_tokens=0, completion_tokens=1000, reasoning_tokens=900)
    without = Usage(prompt_tokens=0, completion_tokens=1000, reasoning_tokens=0)
    assert compute_cost(with_reasoning, SONNET, at=AT).total_cost == D("0.015")
    assert (
        compute_cost(with_reasoning, SONNET, at=AT).total_cost
        == compute_cost(without, SONNET, at=AT).total_cost
    )


def test_distinct_internal_reasoning_price_books_only_the_difference() -> None:
    # perplexity/sonar-deep-research style: reasoning $3/M while completion is $8/M.
    pricing = parse_pricing(
        {"prompt": "0.000002", "completion": "0.000008", "internal_reasoning": "0.000003"}
    )
    b = compute_cost(Usage(completion_tokens=1000, reasoning_tokens=400), pricing, at=AT)
    assert b.completion_cost == D("0.008")
    assert b.internal_reasoning_cost == D("-0.002")  # 400 × (3 − 8)/M
    assert b.total_cost == D("0.006")  # 600 × $8/M + 400 × $3/M


def test_zero_internal_reasoning_in_2025_catalogue_means_no_separate_price() -> None:
    pricing = parse_pricing(
        {"prompt": "0.000001", "completion": "0.000004", "internal_reasoning": "0"}
    )
    b = compute_cost(Usage(completion_tokens=100, reasoning_tokens=100), pricing, at=AT)
    assert b.internal_reasoning_cost == 0
    assert b.total_cost == D("0.0004")


def test_cache_writes_use_their_own_prices_by_ttl() -> None:
    usage = Usage(
        prompt_tokens=1000 + 2000 + 400 + 600,
        uncached_input_tokens=1000,
        cache_read_tokens=2000,
        cache_write_tokens=400,
        cache_write_1h_tokens=600,
    )
    b = compute_cost(usage, SONNET, at=AT)
    assert b.prompt_cost == D("0.003")  # 1,000 × $3/M
    assert b.cache_read_cost == D("0.0006")  # 2,000 × $0.30/M
    assert b.cache_write_cost == D("0.0015") + D("0.0036")  # 400 × $3.75/M + 600 × $6/M
    assert b.total_cost == D("0.0087")


def test_anthropic_native_cache_write_5m_matches_the_documented_formula() -> None:
    # input 3, read 1,111, 5m write 418, output 33 → $0.0024048 (Anthropic's own formula)
    usage = parse_usage(
        {
            "input_tokens": 3,
            "cache_creation_input_tokens": 418,
            "cache_read_input_tokens": 1111,
            "cache_creation": {"ephemeral_5m_input_tokens": 418, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 33,
        }
    ).usage
    assert compute_cost(usage, SONNET, at=AT).total_cost == D("0.0024048")


def test_missing_cache_prices_fall_back_to_the_prompt_rate() -> None:
    pricing = parse_pricing({"prompt": "0.000001", "completion": "0.000002"})
    usage = Usage(
        prompt_tokens=30,
        uncached_input_tokens=10,
        cache_read_tokens=10,
        cache_write_tokens=5,
        cache_write_1h_tokens=5,
    )
    assert compute_cost(usage, pricing, at=AT).total_cost == D("0.00003")


def test_one_hour_write_falls_back_to_the_five_minute_rate() -> None:
    pricing = parse_pricing(
        {"prompt": "0.000001", "completion": "0.000002", "input_cache_write": "0.00000125"}
    )
    usage = Usage(prompt_tokens=1000, cache_write_1h_tokens=1000)
    assert compute_cost(usage, pricing, at=AT).cache_write_cost == D("0.00125")


def test_gemini_explicit_cache_overlap_bills_reads_and_writes() -> None:
    # 5,000 prompt: 4,900 read (written tokens reported as read too) and 4,900 written.
    pricing = parse_pricing(
        {
            "prompt": "0.0000003",
            "completion": "0.0000025",
            "input_cache_read": "0.00000003",
            "input_cache_write": "0.0000000833333333333333",
        }
    )
    usage = parse_usage(
        {
            "prompt_tokens": 5000,
            "completion_tokens": 0,
            "prompt_tokens_details": {"cached_tokens": 4900, "cache_write_tokens": 4900},
        }
    ).usage
    b = compute_cost(usage, pricing, at=AT)
    assert b.prompt_cost == D("0.00003")  # 100 × $0.30/M
    assert b.cache_read_cost == D("0.000147")  # 4,900 × $0.03/M
    assert b.cache_write_cost == D("4900") * D("0.0000000833333333333333")


def test_request_web_search_and_image_charges() -> None:
    pricing = parse_pricing(
        {
            "prompt": "0",
            "completion": "0",
            "request": "0.005",
            "web_search": "0.01",
            "image": "0.0048",
        }
    )
    b = compute_cost(Usage(web_search_requests=3, images=2, requests=1), pricing, at=AT)
    assert (b.request_cost, b.web_search_cost, b.image_cost) == (D("0.005"), D("0.03"), D("0.0096"))
    assert b.total_cost == D("0.0446")


def test_long_context_tier_applies_strictly_above_the_threshold() -> None:
    at_threshold = Usage(
        prompt_tokens=200_000, uncached_input_tokens=200_000, completion_tokens=1000
    )
    above = Usage(prompt_tokens=200_001, uncached_input_tokens=200_001, completion_tokens=1000)
    base = compute_cost(at_threshold, SONNET, at=AT)
    tiered = compute_cost(above, SONNET, at=AT)
    assert base.tier is None
    assert base.total_cost == D("0.6") + D("0.015")
    assert tiered.tier is not None and tiered.tier.min_prompt_tokens == 200_000
    assert tiered.total_cost == D("200001") * D("0.000006") + D("0.0225")
    assert tiered.to_json()["tier"] == {"min_prompt_tokens": 200_000}


def test_tier_counts_cached_tokens_toward_the_threshold() -> None:
    usage = Usage(
        prompt_tokens=250_000,
        uncached_input_tokens=50_000,
        cache_read_tokens=200_000,
        completion_tokens=0,
    )
    b = compute_cost(usage, SONNET, at=AT)
    assert b.cache_read_cost == D("0.12")  # 200,000 × $0.60/M (tier read price)
    assert b.prompt_cost == D("0.3")  # 50,000 × $6/M


def test_time_of_day_window_wrapping_midnight() -> None:
    pricing = parse_pricing(
        {
            "prompt": "0.000001",
            "completion": "0.000002",
            "overrides": [{"utc_start": 1000, "utc_end": 100, "prompt": "0.0000005"}],
        }
    )
    usage = Usage(prompt_tokens=1000, uncached_input_tokens=1000)

    def at(hour: int, minute: int = 0) -> Decimal:
        when = datetime(2026, 1, 1, hour, minute, tzinfo=UTC)
        return compute_cost(usage, pricing, at=when).total_cost

    assert at(12) == D("0.0005")  # inside 10:00–01:00
    assert at(0, 30) == D("0.0005")
    assert at(5) == D("0.001")  # outside
    # The window is in UTC whatever offset the time is written with: 10:30+02:00 is 08:30Z.
    from datetime import timedelta, timezone

    plus_two = timezone(timedelta(hours=2))
    assert compute_cost(
        usage, pricing, at=datetime(2026, 1, 1, 10, 30, tzinfo=plus_two)
    ).total_cost == D("0.001")
    assert compute_cost(
        usage, pricing, at=datetime(2026, 1, 1, 14, 0, tzinfo=plus_two)
    ).total_cost == D("0.0005")


def test_components_sum_to_total_and_serialise_as_plain_decimals() -> None:
    usage = Usage(
        prompt_tokens=3000,
        uncached_input_tokens=1000,
        cache_read_tokens=1500,
        cache_write_tokens=500,
        completion_tokens=77,
        reasoning_tokens=7,
        web_search_requests=1,
    )
    b = compute_cost(usage, SONNET, price_version=42, at=AT)
    assert sum(getattr(b, c) for c in COMPONENTS) == b.total_cost
    doc = b.to_json()
    assert doc["price_version"] == 42
    assert all("E" not in doc[c] and "e" not in doc[c] for c in (*COMPONENTS, "total_cost"))
    assert doc["cache_read_cost"] == "0.00045"
