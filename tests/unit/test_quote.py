"""The quote document shared by the HTTP API and the CLI."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from services.core.errors import PriceNotFound, PricingError, QuoteRequestError, UsageError
from services.core.pricebook import InMemoryPriceBook
from services.core.pricing import parse_pricing
from services.core.quote import error_json, quote

SONNET_USAGE = {
    "prompt_tokens": 1800,
    "completion_tokens": 320,
    "prompt_tokens_details": {"cached_tokens": 600},
    "completion_tokens_details": {"reasoning_tokens": 24},
}


def test_price_only(snapshot_book: InMemoryPriceBook) -> None:
    answer = quote({"provider_model_id": "anthropic/claude-sonnet-4-5"}, snapshot_book)
    assert answer["model"] == "anthropic/claude-sonnet-4.5"
    assert answer["pricing"]["prompt"] == "0.000003"
    assert answer["effective_from"] == "2025-09-29T00:00:00+00:00"
    assert isinstance(answer["price_version"], int)
    assert "breakdown" not in answer


def test_usage_adds_breakdown_and_drift(snapshot_book: InMemoryPriceBook) -> None:
    answer = quote(
        {
            "provider_model_id": "anthropic/claude-sonnet-4.5",
            "usage": {**SONNET_USAGE, "cost": Decimal("0.0086")},
        },
        snapshot_book,
    )
    assert answer["breakdown"]["total_cost"] == "0.00858"
    assert answer["breakdown"]["price_version"] == answer["price_version"]
    assert answer["reported_cost"] == "0.0086"
    assert answer["drift"] == "-0.00002"
    assert answer["usage"]["uncached_input_tokens"] == 1200


def test_what_if_pricing_and_native_format(snapshot_book: InMemoryPriceBook) -> None:
    answer = quote(
        {
            "provider_model_id": "my/private-model",
            "format": "anthropic",
            "usage": {"input_tokens": 1000, "output_tokens": 100},
            "pricing": {"prompt": "0.000001", "completion": "0.00001"},
        },
        snapshot_book,
    )
    assert answer["price_source"] == "request"
    assert answer["price_version"] is None
    assert answer["breakdown"]["total_cost"] == "0.002"


def test_at_selects_the_historic_price() -> None:
    book = InMemoryPriceBook()
    book.record(
        "acme/a",
        parse_pricing({"prompt": "0.000001", "completion": "0"}),
        effective_from=datetime(2026, 1, 1, tzinfo=UTC),
    )
    book.record(
        "acme/a",
        parse_pricing({"prompt": "0.000002", "completion": "0"}),
        effective_from=datetime(2026, 6, 1, tzinfo=UTC),
    )
    usage = {"prompt_tokens": 1000}
    early = quote(
        {"provider_model_id": "acme/a", "usage": usage, "at": "2026-03-01T00:00:00Z"}, book
    )
    late = quote(
        {"provider_model_id": "acme/a", "usage": usage, "at": "2026-07-01T00:00:00Z"}, book
    )
    assert (early["breakdown"]["total_cost"], late["breakdown"]["total_cost"]) == ("0.001", "0.002")


@pytest.mark.parametrize(
    ("request_doc", "error", "field"),
    [
        ({}, QuoteRequestError, "provider_model_id"),
        ({"provider_model_id": ""}, QuoteRequestError, "provider_model_id"),
        ({"provider_model_id": "openai/gpt-5", "at": "yesterday"}, QuoteRequestError, "at"),
        (
            {"provider_model_id": "openai/gpt-5", "at": "2026-01-01T00:00:00"},
            QuoteRequestError,
            "at",
        ),
        ({"provider_model_id": "openai/gpt-5", "format": 3}, QuoteRequestError, "format"),
        (
            {"provider_model_id": "openai/gpt-5", "usage": {"prompt_tokens": -1}},
            UsageError,
            "usage.prompt_tokens",
        ),
        (
            {"provider_model_id": "x/y", "pricing": {"prompt": "1"}},
            PricingError,
            "pricing.completion",
        ),
    ],
)
def test_bad_requests_raise_typed_errors(
    snapshot_book: InMemoryPriceBook, request_doc: dict[str, object], error: type, field: str
) -> None:
    with pytest.raises(error) as caught:
        quote(request_doc, snapshot_book)
    assert error_json(caught.value)["field"] == field


def test_unknown_model_error_document(snapshot_book: InMemoryPriceBook) -> None:
    with pytest.raises(PriceNotFound) as caught:
        quote({"provider_model_id": "openai/gpt-5-mni"}, snapshot_book)
    doc = error_json(caught.value)
    assert doc["model"] == "openai/gpt-5-mni"
    assert "openai/gpt-5-mini" in doc["suggestions"]
    assert doc["error"].startswith("no price for model")


def test_price_before_the_first_version_is_not_found(snapshot_book: InMemoryPriceBook) -> None:
    with pytest.raises(PriceNotFound, match="in effect at 2020"):
        quote({"provider_model_id": "openai/gpt-5", "at": "2020-01-01T00:00:00Z"}, snapshot_book)
