"""Usage normalisation: every wire format into one shape, and typed errors for bad input."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from services.core.errors import UsageError
from services.core.usage import ReportedCost, Usage, check_usage, detect_format, parse_usage
from tests.conftest import load_json, shared_fixture


def test_openai_chat_cached_and_reasoning_are_parts_of_their_totals() -> None:
    parsed = parse_usage(
        {
            "prompt_tokens": 1800,
            "completion_tokens": 320,
            "total_tokens": 2120,
            "prompt_tokens_details": {"cached_tokens": 600, "cache_write_tokens": 100},
            "completion_tokens_details": {"reasoning_tokens": 24},
            "server_tool_use_details": {"web_search_requests": 2},
        }
    )
    assert parsed.format == "openai"
    assert parsed.usage == Usage(
        prompt_tokens=1800,
        uncached_input_tokens=1100,
        cache_read_tokens=600,
        cache_write_tokens=100,
        completion_tokens=320,
        reasoning_tokens=24,
        web_search_requests=2,
    )
    assert parsed.reported is None


def test_reported_cost_and_byok_keep_the_providers_charge() -> None:
    plain = parse_usage({"prompt_tokens": 1, "completion_tokens": 1, "cost": Decimal("0.5")})
    assert plain.reported == ReportedCost(cost=Decimal("0.5"))
    assert plain.reported.provider_charge == Decimal("0.5")
    byok = parse_usage(
        {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "cost": "0",
            "is_byok": True,
            "cost_details": {"upstream_inference_cost": "0.0042"},
        }
    )
    assert byok.reported is not None
    assert byok.reported.is_byok
    assert byok.reported.provider_charge == Decimal("0.0042")


def test_original_design_nesting_is_accepted() -> None:
    nested = parse_usage({"usage": {"prompt_tokens": 5, "completion_tokens": 7}})
    assert nested.usage.prompt_tokens == 5
    assert nested.usage.completion_tokens == 7


def test_responses_api_counts_cached_inside_input() -> None:
    parsed = parse_usage(
        {
            "input_tokens": 4020,
            "input_tokens_details": {"cached_tokens": 4012},
            "output_tokens": 5,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 4025,
        }
    )
    assert parsed.format == "openai_responses"
    assert parsed.usage.uncached_input_tokens == 8
    assert parsed.usage.cache_read_tokens == 4012


def test_anthropic_input_tokens_exclude_cache_and_split_ttls() -> None:
    parsed = parse_usage(
        {
            "input_tokens": 10,
            "cache_creation_input_tokens": 9365,
            "cache_read_input_tokens": 21611,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 9365},
            "output_tokens": 44,
            "server_tool_use": {"web_search_requests": 1},
        },
        "anthropic",
    )
    u = parsed.usage
    assert u.prompt_tokens == 10 + 21611 + 9365
    assert (u.uncached_input_tokens, u.cache_read_tokens) == (10, 21611)
    assert (u.cache_write_tokens, u.cache_write_1h_tokens) == (0, 9365)
    assert u.web_search_requests == 1


def test_anthropic_without_split_treats_writes_as_five_minute() -> None:
    u = parse_usage(
        {"input_tokens": 3, "cache_creation_input_tokens": 418, "output_tokens": 1}
    ).usage
    assert (u.cache_write_tokens, u.cache_write_1h_tokens, u.prompt_tokens) == (418, 0, 421)


def test_gemini_thoughts_are_added_to_candidates() -> None:
    parsed = parse_usage(
        {
            "usageMetadata": {
                "promptTokenCount": 17713,
                "cachedContentTokenCount": 17379,
                "candidatesTokenCount": 68,
                "thoughtsTokenCount": 821,
                "totalTokenCount": 18602,
            }
        }
    )
    u = parsed.usage
    assert parsed.format == "gemini"
    assert (u.prompt_tokens, u.uncached_input_tokens, u.cache_read_tokens) == (17713, 334, 17379)
    assert (u.completion_tokens, u.reasoning_tokens) == (68 + 821, 821)


def test_usage_metadata_without_counts_is_refused_not_billed_at_zero() -> None:
    # A streaming response's first chunk: {"trafficType": "ON_DEMAND"} and no counts.
    with pytest.raises(UsageError) as caught:
        parse_usage({"usageMetadata": {"trafficType": "ON_DEMAND"}})
    assert caught.value.field == "usage.usageMetadata.promptTokenCount"


def test_gemini_explicit_cache_reports_writes_as_reads_too() -> None:
    # Written tokens appear in cached_tokens as well: reads + writes exceed the prompt.
    u = parse_usage(
        {
            "prompt_tokens": 5000,
            "completion_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 4900, "cache_write_tokens": 4900},
        }
    ).usage
    assert u.uncached_input_tokens == 100
    assert (u.cache_read_tokens, u.cache_write_tokens) == (4900, 4900)


def test_normalised_shape_round_trips() -> None:
    usage = Usage(
        prompt_tokens=10, uncached_input_tokens=4, cache_read_tokens=6, completion_tokens=3
    )
    assert parse_usage(usage.as_dict()).usage == usage


@pytest.mark.parametrize(
    ("usage", "fmt", "field"),
    [
        ({"prompt_tokens": -1}, None, "usage.prompt_tokens"),
        ({"prompt_tokens": 1.5}, None, "usage.prompt_tokens"),
        ({"prompt_tokens": "12"}, None, "usage.prompt_tokens"),
        ({"prompt_tokens": True}, None, "usage.prompt_tokens"),
        ({"completion_tokens": 3}, "openai", "usage.prompt_tokens"),
        (
            {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 11}},
            None,
            "usage.prompt_tokens_details.cached_tokens",
        ),
        (
            {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "completion_tokens_details": {"reasoning_tokens": 6},
            },
            None,
            "usage.completion_tokens_details.reasoning_tokens",
        ),
        (
            {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 14},
            None,
            "usage.total_tokens",
        ),
        (
            {
                "prompt_tokens": 10,
                "prompt_tokens_details": {"cached_tokens": 6, "cache_write_tokens": 8},
            },
            None,
            "usage.prompt_tokens",
        ),
        ({"prompt_tokens": 10, "prompt_tokens_details": []}, None, "usage.prompt_tokens_details"),
        ({"prompt_tokens": 10**40}, None, "usage.prompt_tokens"),
        ({"prompt_tokens": 1, "cost": "1E+1000000"}, None, "usage.cost"),
        ({"usage": 5}, None, "usage.usage"),
        ({"prompt_tokens": 1, "cost": 0.25}, None, "usage.cost"),
        ({"prompt_tokens": 1, "cost": "-1"}, None, "usage.cost"),
        ({"prompt_tokens": 1, "cost": "abc"}, None, "usage.cost"),
        ({"prompt_tokens": 1, "cost": "1", "is_byok": "yes"}, None, "usage.is_byok"),
        (
            {
                "input_tokens": 1,
                "cache_creation_input_tokens": 10,
                "cache_creation": {"ephemeral_5m_input_tokens": 4, "ephemeral_1h_input_tokens": 4},
            },
            None,
            "usage.cache_creation",
        ),
        (
            {"promptTokenCount": 5, "cachedContentTokenCount": 6},
            None,
            "usage.cachedContentTokenCount",
        ),
        (
            {
                "promptTokenCount": 5,
                "candidatesTokenCount": 1,
                "thoughtsTokenCount": 2,
                "totalTokenCount": 7,
            },
            None,
            "usage.totalTokenCount",
        ),
        ({"hello": 1}, None, "usage"),
        ({"prompt_tokens": 1}, "cohere", "format"),
        ({"prompt_tokens": 1, "uncached_input_tokens": 2}, None, "usage.uncached_input_tokens"),
        ({"prompt_tokens": 1, "uncached_input_tokens": 1, "bogus": 1}, "normalised", "usage.bogus"),
    ],
)
def test_bad_usage_raises_a_typed_error_naming_the_field(
    usage: dict[str, Any], fmt: str | None, field: str
) -> None:
    with pytest.raises(UsageError) as caught:
        parse_usage(usage, fmt)
    assert caught.value.field == field


def test_anthropic_web_searches_count_without_cache_fields() -> None:
    u = parse_usage(
        {"input_tokens": 100, "output_tokens": 50, "server_tool_use": {"web_search_requests": 2}}
    ).usage
    assert u.web_search_requests == 2


def test_non_string_keys_give_a_typed_error() -> None:
    with pytest.raises(UsageError):
        parse_usage({"prompt_tokens": 1, "uncached_input_tokens": 1, 1: 2, "zz": 3}, "normalised")


def test_non_object_usage_is_rejected() -> None:
    with pytest.raises(UsageError, match="must be an object"):
        parse_usage([1, 2, 3])


def test_check_usage_rejects_reasoning_above_completion() -> None:
    with pytest.raises(UsageError) as caught:
        check_usage(Usage(completion_tokens=1, reasoning_tokens=2))
    assert caught.value.field == "usage.reasoning_tokens"


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"prompt_tokens": 1}, "openai"),
        ({"input_tokens": 1, "total_tokens": 1}, "openai_responses"),
        ({"input_tokens": 1, "cache_read_input_tokens": 0}, "anthropic"),
        ({"input_tokens": 1, "output_tokens": 1, "server_tool_use": {}}, "anthropic"),
        ({"input_tokens": 1, "output_tokens": 1}, "anthropic"),
        ({"promptTokenCount": 1}, "gemini"),
        ({"prompt_tokens": 1, "uncached_input_tokens": 1}, "normalised"),
    ],
)
def test_format_detection(keys: dict[str, int], expected: str) -> None:
    assert detect_format(keys) == expected


# -- real provider examples (../shared/fixtures/native) ------------------------------------------


def test_native_anthropic_examples_add_up() -> None:
    doc = load_json(shared_fixture("native/anthropic_messages_cache_write_5m.json"))
    u = parse_usage(doc["usage"], "anthropic").usage
    assert u.prompt_tokens == doc["interpretation"]["total_input_tokens"]
    assert (u.cache_write_tokens, u.cache_read_tokens, u.uncached_input_tokens) == (418, 1111, 3)


def test_native_openai_examples_keep_reasoning_inside_completion() -> None:
    chat = load_json(shared_fixture("native/openai_chat_completions_reasoning.json"))
    u = parse_usage(chat["usage"], "openai").usage
    assert (u.completion_tokens, u.reasoning_tokens) == (2320, 1792)
    responses = load_json(shared_fixture("native/openai_responses_reasoning.json"))
    r = parse_usage(responses["usage"], "openai_responses").usage
    assert (r.prompt_tokens, r.completion_tokens, r.reasoning_tokens) == (13, 1915, 1600)
    write = load_json(
        shared_fixture("native/openai_chat_completions_cache_write_then_read_gpt-5.6.json")
    )
    w = parse_usage(write["usage_first_call_cache_write"]).usage
    assert (w.cache_write_tokens, w.uncached_input_tokens) == (4012, 8)


@pytest.mark.parametrize(
    "name",
    [
        "gemini_2.5_flash_thoughts.json",
        "gemini_3_flash_thoughts.json",
        "gemini_2.5_flash_implicit_cache_video_thoughts.json",
    ],
)
def test_native_gemini_examples_count_thoughts_once(name: str) -> None:
    doc = load_json(shared_fixture(f"native/{name}"))
    meta = doc["usageMetadata"]
    u = parse_usage(doc).usage
    assert u.prompt_tokens + u.completion_tokens == meta["totalTokenCount"]
    assert u.reasoning_tokens == meta["thoughtsTokenCount"]


def test_native_vertex_final_chunk() -> None:
    doc = load_json(shared_fixture("native/vertex_gemini_2.0_flash_usageMetadata_sse.json"))
    u = parse_usage({"usageMetadata": doc["final_chunk_usageMetadata"]}).usage
    assert (u.prompt_tokens, u.completion_tokens) == (11227, 1)
