"""The fake upstream speaks OpenRouter and Gemini faithfully enough to bill from."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal

import pytest
from fastapi.testclient import TestClient

from services.adapters.pricing_cache import sync_catalogue
from services.core.catalogue import parse_catalogue
from services.core.pricebook import InMemoryPriceBook
from services.core.quote import quote
from services.core.usage import parse_usage
from services.local.fake_upstream import FakeConfig, create_fake_upstream

pytestmark = pytest.mark.integration

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello " * 40}]}


@pytest.fixture
def upstream() -> Iterator[TestClient]:
    with TestClient(create_fake_upstream(FakeConfig(completion_tokens=12))) as client:
        yield client


def sse(text: str) -> list[dict[str, object]]:
    return [
        json.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def test_chat_json_usage_adds_up_and_its_cost_is_ours(
    upstream: TestClient, snapshot_book: InMemoryPriceBook
) -> None:
    response = upstream.post(
        "/api/v1/chat/completions",
        json=CHAT,
        headers={"x-fake-reasoning-tokens": "5", "x-fake-cached-tokens": "20"},
    )
    assert response.status_code == 200
    body = json.loads(response.content, parse_float=Decimal)
    usage = parse_usage(body["usage"]).usage
    assert (usage.completion_tokens, usage.reasoning_tokens, usage.cache_read_tokens) == (12, 5, 20)
    priced = quote({"provider_model_id": CHAT["model"], "usage": body["usage"]}, snapshot_book)
    assert priced["drift"] == "0"  # the reported cost is a JSON number, exact to the digit
    assert isinstance(body["usage"]["cost"], Decimal)


def test_chat_stream_carries_usage_in_the_final_chunk(upstream: TestClient) -> None:
    response = upstream.post("/v1/chat/completions", json={**CHAT, "stream": True})
    chunks = sse(response.text)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(content.split()) == 12
    assert "usage" in chunks[-1] and all("usage" not in c for c in chunks[:-1])
    assert response.text.rstrip().endswith("data: [DONE]")


def test_a_cut_stream_has_no_usage_and_errors_pass_through(upstream: TestClient) -> None:
    cut = upstream.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers={"x-fake-cut-after": "3"}
    )
    chunks = sse(cut.text)
    assert len(chunks) == 3 and all("usage" not in c for c in chunks)
    assert "[DONE]" not in cut.text
    failed = upstream.post("/v1/chat/completions", json=CHAT, headers={"x-fake-status": "500"})
    assert failed.status_code == 500


def test_gemini_counts_thoughts_outside_candidates(upstream: TestClient) -> None:
    request = {"contents": [{"role": "user", "parts": [{"text": "why " * 30}]}]}
    headers = {"x-fake-reasoning-tokens": "4"}
    plain = upstream.post(
        "/v1beta/models/gemini-2.5-flash:generateContent", json=request, headers=headers
    )
    meta = plain.json()["usageMetadata"]
    assert meta["candidatesTokenCount"] + meta["thoughtsTokenCount"] == 12
    assert meta["totalTokenCount"] == meta["promptTokenCount"] + 12
    assert parse_usage(plain.json()).usage.completion_tokens == 12
    streamed = upstream.post(
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        json=request,
        headers=headers,
    )
    chunks = sse(streamed.text)
    assert chunks[-1]["usageMetadata"] == meta
    assert all("promptTokenCount" not in c["usageMetadata"] for c in chunks[:-1])


def test_models_lists_every_priced_model_at_the_prices_it_bills_with(
    upstream: TestClient, snapshot_book: InMemoryPriceBook
) -> None:
    response = upstream.get("/api/v1/models")
    assert response.status_code == 200
    document = json.loads(response.content, parse_float=Decimal)
    catalogue = parse_catalogue(document)
    assert catalogue.skipped == []
    assert {e.model for e in catalogue.entries} == set(snapshot_book.models())
    assert all("effective_from" not in row for row in document["data"])  # OpenRouter's shape
    # A gateway syncing from the fake records nothing new: the same prices, to the digit.
    report = sync_catalogue(snapshot_book, document, source="openrouter")
    assert (report.new_versions, report.unchanged) == (0, len(catalogue.entries))
    assert upstream.get("/v1/models").json() == response.json()
