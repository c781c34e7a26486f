"""Price corrections: a new override version; the prices named replace, the rest carry over."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from services.core.corrections import parse_changes, record_correction
from services.core.errors import PricingError
from services.core.pricebook import InMemoryPriceBook

MARCH = datetime(2026, 3, 1, tzinfo=UTC)


def test_changes_are_checked_and_converted_from_per_million() -> None:
    assert parse_changes({"prompt": "2.5", "completion": None}, per_million=True) == {
        "prompt": Decimal("0.0000025")
    }
    assert parse_changes({"input_cache_read": Decimal("1E-7")}) == {
        "input_cache_read": Decimal("1E-7")
    }
    with pytest.raises(PricingError, match="negative"):
        parse_changes({"prompt": "-1"})
    with pytest.raises(PricingError, match="prompt"):
        parse_changes({"prompt": "cheap"})
    with pytest.raises(PricingError, match="at least one price"):
        parse_changes({"request": "1"})


def test_a_correction_replaces_what_it_names_and_keeps_the_rest(
    snapshot_book: InMemoryPriceBook,
) -> None:
    before = snapshot_book.lookup("openai/gpt-4o", MARCH)
    version, base = record_correction(
        snapshot_book,
        "openai/gpt-4o",
        {"prompt": Decimal("0.000002")},
        effective_from=MARCH,
        reason="negotiated",
        by="alice",
    )
    assert version is not None and base is before
    assert version.layer == "override" and version.source == "correction by alice"
    assert version.pricing.prompt == Decimal("0.000002")
    assert version.pricing.completion == before.pricing.completion
    assert version.pricing.input_cache_read == before.pricing.input_cache_read
    assert snapshot_book.lookup("openai/gpt-4o", MARCH) is version
    assert snapshot_book.lookup("openai/gpt-4o", datetime(2026, 2, 28, tzinfo=UTC)) is before
    assert [v.version for v in snapshot_book.history("openai/gpt-4o")][-1] == version.version
    # the same correction again changes nothing
    again, _ = record_correction(
        snapshot_book,
        "openai/gpt-4o",
        {"prompt": Decimal("0.000002")},
        effective_from=MARCH,
        reason="negotiated",
        by="alice",
    )
    assert again is None


def test_a_model_priced_late_needs_both_base_prices(snapshot_book: InMemoryPriceBook) -> None:
    with pytest.raises(PricingError, match="completion"):
        record_correction(
            snapshot_book,
            "acme/new-model",
            {"prompt": Decimal("0.000001")},
            effective_from=MARCH,
            reason="priced late",
            by="bob",
        )
    version, base = record_correction(
        snapshot_book,
        "acme/new-model",
        {"prompt": Decimal("0.000001"), "completion": Decimal("0.000003")},
        effective_from=MARCH,
        reason="priced late",
        by="bob",
    )
    assert base is None and version is not None
    assert snapshot_book.lookup("acme/new-model", MARCH).pricing.completion == Decimal("0.000003")


@pytest.mark.parametrize(("reason", "by", "field"), [(" ", "alice", "reason"), ("x", "", "by")])
def test_who_and_why_are_required(
    snapshot_book: InMemoryPriceBook, reason: str, by: str, field: str
) -> None:
    with pytest.raises(PricingError, match=field):
        record_correction(
            snapshot_book,
            "openai/gpt-4o",
            {"prompt": Decimal(1)},
            effective_from=MARCH,
            reason=reason,
            by=by,
        )


def test_a_per_million_price_too_fine_per_token_is_refused() -> None:
    fine = "0." + "1" * 26  # 26 places per million is 32 per token: over the bound
    with pytest.raises(PricingError, match="per token"):
        parse_changes({"prompt": fine}, per_million=True)
    assert parse_changes({"prompt": "0." + "1" * 24}, per_million=True)["prompt"] == Decimal(
        "0." + "0" * 6 + "1" * 24
    )


@pytest.mark.parametrize(("layer", "june_prompt"), [("override", "1E-6"), ("catalogue", "5E-7")])
def test_the_layer_decides_whether_a_later_catalogue_change_applies(
    snapshot_book: InMemoryPriceBook, layer: str, june_prompt: str
) -> None:
    record_correction(
        snapshot_book,
        "openai/gpt-5",
        {"prompt": Decimal("1E-6")},
        effective_from=MARCH,
        reason="fix",
        by="alice",
        layer=layer,  # type: ignore[arg-type]
    )
    may = snapshot_book.lookup("openai/gpt-5", MARCH).pricing
    snapshot_book.record(  # the catalogue changes in May
        "openai/gpt-5",
        replace(may, prompt=Decimal("5E-7")),
        effective_from=datetime(2026, 5, 1, tzinfo=UTC),
    )
    june = snapshot_book.lookup("openai/gpt-5", datetime(2026, 6, 1, tzinfo=UTC))
    assert june.pricing.prompt == Decimal(june_prompt)
