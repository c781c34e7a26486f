"""Accuracy over 1,600+ real OpenRouter charges, priced through the public quote API.

Each charge whose model has a known price (``prices-in-effect.json``) is quoted with its raw
``usage`` at its own time; our total is compared with OpenRouter's ``usage.cost``. BYOK
charges are skipped: their ``cost`` is only OpenRouter's fee.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.adapters.pricebook_file import FilePriceBook
from services.adapters.pricing_cache import PricingCache
from services.adapters.settings import Settings
from services.core.pricing import parse_pricing
from services.gateway.app import create_app
from tests.conftest import load_json, shared_fixture

pytestmark = pytest.mark.integration

WITHIN = Decimal("0.0001")
EXACT = Decimal("0.000000001")
REQUIRED_SHARE = Decimal("0.93")


def _reference_book(path: Path, prices: dict[str, dict[str, object]]) -> FilePriceBook:
    book = FilePriceBook(path)
    since = datetime(2024, 1, 1, tzinfo=UTC)
    with book.batch():
        for model, entry in prices.items():
            if model.startswith("_") or "alias" in entry:
                continue
            raw = {k: v for k, v in entry.items() if k != "src"}
            book.record(model, parse_pricing(raw, model), effective_from=since, source="reference")
        for model, entry in prices.items():
            if not model.startswith("_") and "alias" in entry:
                book.add_alias(model, str(entry["alias"]))
    return book


def test_real_charges_are_reproduced(tmp_path: Path, report: Callable[[str], None]) -> None:
    prices = load_json(shared_fixture("openrouter/prices-in-effect.json"))
    charges_path = shared_fixture("openrouter/charges.jsonl")
    book = _reference_book(tmp_path / "prices.jsonl", prices)
    app = create_app(
        Settings(data_dir=tmp_path, catalogue_sync=False), cache=PricingCache(book, None)
    )

    priced = within = exact = byok = 0
    misses: Counter[str] = Counter()
    with TestClient(app) as client:
        for line in charges_path.read_text().splitlines():
            charge = json.loads(line, parse_float=Decimal)
            if charge["model"] not in prices:
                continue
            if charge["usage"].get("is_byok"):
                byok += 1
                continue
            request = {
                "provider_model_id": charge["model"],
                "usage": charge["usage"],
                "format": "openai_responses" if charge["api"] == "responses" else "openai",
                "at": charge["created"],
            }
            response = client.post(
                "/internal/billing/quote", content=json.dumps(request, default=str)
            )
            assert response.status_code == 200, (charge["case_id"], response.text)
            body = response.json()
            drift = abs(Decimal(body["drift"]))
            assert Decimal(body["reported_cost"]) == Decimal(str(charge["reported_cost"]))
            priced += 1
            within += drift < WITHIN
            exact += drift < EXACT
            if drift >= WITHIN:
                misses[charge["model"]] += 1

    share = Decimal(within) / Decimal(priced)
    report(
        f"corpus accuracy: {priced} priced charges ({byok} BYOK skipped): "
        f"{within} within $0.0001 ({share:.1%}), {exact} exact to $1e-9 "
        f"({Decimal(exact) / Decimal(priced):.1%}); off: {dict(misses.most_common(5))}"
    )
    assert priced > 400
    assert share >= REQUIRED_SHARE
