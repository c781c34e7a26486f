"""Pricing objects and catalogues in both of OpenRouter's shapes."""

from __future__ import annotations

from decimal import Decimal

import pytest

from services.core.catalogue import default_catalogue, parse_catalogue
from services.core.errors import PricingError, VariablePricing
from services.core.pricing import parse_pricing
from tests.conftest import OWN_FIXTURES, load_json, shared_fixture

D = Decimal


def test_2025_shape_zero_strings_and_absent_optionals() -> None:
    catalogue = parse_catalogue(load_json(OWN_FIXTURES / "catalogue_2025_shape.json"))
    by_id = {e.model: e for e in catalogue.entries}
    alpha = by_id["acme/alpha-1"].pricing
    assert (alpha.prompt, alpha.completion, alpha.image) == (
        D("0.000002"),
        D("0.000008"),
        D("0.001"),
    )
    assert alpha.internal_reasoning is None  # "0" means "no separate price"
    assert alpha.input_cache_write_1h is None
    assert by_id["acme/beta-2:free"].pricing.prompt == 0
    skipped = dict(catalogue.skipped)
    assert "variable price" in skipped["openrouter/auto"]
    assert "pricing.prompt" in skipped["acme/broken"]


def test_2026_shape_overrides_slugs_and_extra_keys() -> None:
    catalogue = parse_catalogue(load_json(OWN_FIXTURES / "catalogue_2026_shape.json"))
    alpha = catalogue.entries[0]
    assert alpha.canonical_slug == "acme/alpha-1-20250101"
    assert alpha.pricing.input_cache_write_1h == D("0.000004")
    (tier,) = alpha.pricing.tiers
    assert tier.min_prompt_tokens == 128000
    assert tier.prices == {"prompt": D("0.0000036"), "completion": D("0.000016")}
    assert alpha.pricing.extra == {"audio": "0.000003"}
    gamma = catalogue.entries[1].pricing
    assert (gamma.tiers[0].utc_start, gamma.tiers[0].utc_end) == (1600, 30)


def test_to_json_round_trips() -> None:
    raw = load_json(OWN_FIXTURES / "catalogue_2026_shape.json")["data"][0]["pricing"]
    pricing = parse_pricing(raw)
    assert parse_pricing(pricing.to_json()) == pricing
    assert pricing.to_json()["overrides"][0] == {
        "min_prompt_tokens": 128000,
        "prompt": "0.0000036",
        "completion": "0.000016",
    }


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"completion": "1"}, "prompt"),
        ({"prompt": "1"}, "completion"),
        ({"prompt": "x", "completion": "1"}, "prompt"),
        ({"prompt": "-0.5", "completion": "1"}, "prompt"),
        ({"prompt": 0.000001, "completion": "1"}, "prompt"),  # binary float refused
        ({"prompt": "NaN", "completion": "1"}, "prompt"),
        ({"prompt": "1E+999999", "completion": "1"}, "prompt"),
        ({"prompt": "1E-99999999", "completion": "1"}, "prompt"),
        ({"prompt": "0.0000000000000000000000000000001", "completion": "1"}, "prompt"),
        ({"prompt": "1", "completion": "1", "overrides": {}}, "overrides"),
        ({"prompt": "1", "completion": "1", "overrides": [1]}, "overrides[0]"),
        (
            {"prompt": "1", "completion": "1", "overrides": [{"min_prompt_tokens": -3}]},
            "overrides[0].min_prompt_tokens",
        ),
        (
            {"prompt": "1", "completion": "1", "overrides": [{"utc_start": 100}]},
            "overrides[0].utc_start",
        ),
    ],
)
def test_bad_pricing_names_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(PricingError) as caught:
        parse_pricing(raw)
    assert caught.value.field == field


def test_variable_price_is_not_billable() -> None:
    with pytest.raises(VariablePricing):
        parse_pricing({"prompt": "-1", "completion": "-1"}, "openrouter/auto")


def test_catalogue_must_be_a_list() -> None:
    with pytest.raises(PricingError):
        parse_catalogue({"data": {"id": "x"}})


def test_bundled_snapshot_has_a_dozen_dated_models() -> None:
    catalogue = default_catalogue()
    assert len(catalogue.entries) >= 12
    assert not catalogue.skipped
    assert all(e.effective_from is not None for e in catalogue.entries)
    assert "anthropic/claude-sonnet-4.5" in {e.model for e in catalogue.entries}


@pytest.mark.parametrize(
    "name", ["models-2026-08-19.json", "models-2025-05-23.json", "models-2025-04-23.json"]
)
def test_real_catalogues_parse(name: str) -> None:
    doc = load_json(shared_fixture(f"openrouter/{name}"))
    catalogue = parse_catalogue(doc)
    assert len(catalogue.entries) + len(catalogue.skipped) == len(doc["data"])
    assert len(catalogue.entries) > 290
    # Every skipped entry is a router with a variable price, never a parse failure.
    assert all("variable price" in reason for _, reason in catalogue.skipped)


def test_real_snapshot_agrees_with_the_bundled_one_on_shared_models() -> None:
    doc = load_json(shared_fixture("openrouter/models-2026-08-19.json"))
    real = {e.model: e.pricing for e in parse_catalogue(doc).entries}
    billed = ("prompt", "completion", "request", "image", "web_search", "input_cache_read")
    billed += ("input_cache_write", "input_cache_write_1h", "tiers")
    for entry in default_catalogue().entries:
        theirs = real[entry.model]
        for key in billed:
            assert getattr(entry.pricing, key) == getattr(theirs, key), (entry.model, key)
        # A reasoning price equal to the completion price changes nothing.
        assert theirs.internal_reasoning in (None, theirs.completion), entry.model
