"""``GET /v1/models``: the priced models, readable by the official ``openai`` SDK."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from services.adapters.pricing_cache import PricingCache
from services.adapters.settings import Settings
from services.core.pricebook import InMemoryPriceBook
from services.core.pricing import parse_pricing
from services.gateway.app import create_app
from services.gateway.models import model_list
from tests.integration.test_proxy import make_key

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(
    database_url: str, tmp_path: Path, snapshot_book: InMemoryPriceBook
) -> Iterator[tuple[TestClient, str, InMemoryPriceBook]]:
    key = asyncio.run(make_key(database_url))
    settings = Settings(data_dir=tmp_path, catalogue_sync=False, database_url=database_url)
    cache = PricingCache(snapshot_book, None)
    with TestClient(create_app(settings, cache)) as client:
        yield client, key, snapshot_book


def test_the_openai_sdk_lists_the_priced_models(
    gateway: tuple[TestClient, str, InMemoryPriceBook],
) -> None:
    client, key, book = gateway
    sdk = openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=client)
    models = list(sdk.models.list())

    assert [m.id for m in models] == book.models()
    by_id = {m.id: m for m in models}
    gpt = by_id["openai/gpt-4o"]
    assert (gpt.object, gpt.owned_by) == ("model", "openai")
    assert gpt.created == int(book.history("openai/gpt-4o")[0].effective_from.timestamp())
    # prices exactly as the quote API shows them: decimal strings, per token
    pricing = (gpt.model_extra or {})["pricing"]
    assert pricing == dict(book.lookup("openai/gpt-4o").pricing_json)
    assert all(isinstance(v, str) for k, v in pricing.items() if k != "overrides")
    assert "google/gemini-2.5-flash" in by_id


def test_the_openai_sdk_retrieves_one_model_or_gets_404(
    gateway: tuple[TestClient, str, InMemoryPriceBook],
) -> None:
    client, key, book = gateway
    sdk = openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=client)
    gpt = sdk.models.retrieve("openai/gpt-4o")
    assert (gpt.id, gpt.owned_by) == ("openai/gpt-4o", "openai")
    assert (gpt.model_extra or {})["pricing"] == dict(book.lookup("openai/gpt-4o").pricing_json)
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("nobody/no-such-model")
    assert client.get("/v1/models/openai/gpt-4o").status_code == 401  # a key is required


def test_a_tenant_key_is_required(gateway: tuple[TestClient, str, InMemoryPriceBook]) -> None:
    client, _, _ = gateway
    assert client.get("/v1/models").status_code == 401
    unknown = client.get("/v1/models", headers={"Authorization": "Bearer bk_0_unknown"})
    assert unknown.status_code == 401
    sdk = openai.OpenAI(api_key="bk_0_unknown", base_url="http://testserver/v1", http_client=client)
    with pytest.raises(openai.AuthenticationError):
        sdk.models.list()


def test_only_models_priced_now_are_listed() -> None:
    book = InMemoryPriceBook()
    now = datetime.now(UTC)
    first = parse_pricing({"prompt": "0.000001", "completion": "0.000002"})
    later = parse_pricing({"prompt": "0.000001", "completion": "0.000004"})
    book.record("acme/current", first, effective_from=now - timedelta(days=30))
    book.record("acme/current", later, effective_from=now - timedelta(days=1))
    book.record("acme/future", first, effective_from=now + timedelta(days=1))
    listed = model_list(book, now)
    assert [m["id"] for m in listed["data"]] == ["acme/current"]
    (entry,) = listed["data"]
    assert entry["created"] == int((now - timedelta(days=30)).timestamp())
    assert entry["pricing"]["completion"] == "0.000004"  # the price now
