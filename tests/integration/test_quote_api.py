"""POST /internal/billing/quote through the FastAPI app (in-process HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.adapters.settings import Settings
from services.gateway.app import create_app

pytestmark = pytest.mark.integration


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "data", catalogue_sync=False)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path / "data", catalogue_sync=False, admin_token="s3cret-t0ken"
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_quote_price_and_usage(client: TestClient) -> None:
    response = client.post(
        "/internal/billing/quote",
        json={
            "provider_model_id": "anthropic/claude-sonnet-4-5",
            "usage": {
                "usage": {
                    "prompt_tokens": 1800,
                    "completion_tokens": 320,
                    "prompt_tokens_details": {"cached_tokens": 600},
                    "completion_tokens_details": {"reasoning_tokens": 24},
                }
            },
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "anthropic/claude-sonnet-4.5"
    assert body["breakdown"]["total_cost"] == "0.00858"
    assert isinstance(body["breakdown"]["total_cost"], str)


def test_money_in_the_request_keeps_full_precision(client: TestClient) -> None:
    # A JSON number in the request is read as a decimal, never through a binary float.
    response = client.post(
        "/internal/billing/quote",
        content=(
            b'{"provider_model_id":"x/y","pricing":{"prompt":0.1,"completion":0.2},'
            b'"usage":{"prompt_tokens":3,"completion_tokens":0,"cost":0.3}}'
        ),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["breakdown"]["total_cost"] == "0.3"
    assert body["drift"] == "0"


def test_native_gemini_format(client: TestClient) -> None:
    response = client.post(
        "/internal/billing/quote",
        json={
            "provider_model_id": "google/gemini-2.5-flash",
            "format": "gemini",
            "usage": {
                "promptTokenCount": 154,
                "candidatesTokenCount": 34,
                "thoughtsTokenCount": 117,
            },
        },
    )
    assert response.status_code == 200, response.text
    # 154 × $0.30/M + (34 + 117) × $2.50/M
    assert response.json()["breakdown"]["total_cost"] == "0.0004237"


def test_unknown_model_is_404_with_suggestions(client: TestClient) -> None:
    response = client.post("/internal/billing/quote", json={"provider_model_id": "openai/gpt5"})
    assert response.status_code == 404
    body = response.json()
    assert body["model"] == "openai/gpt5"
    assert "openai/gpt-5" in body["suggestions"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (
            {"provider_model_id": "openai/gpt-5", "usage": {"prompt_tokens": "ten"}},
            "usage.prompt_tokens",
        ),
        (
            {
                "provider_model_id": "openai/gpt-5",
                "usage": {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 9}},
            },
            "usage.prompt_tokens_details.cached_tokens",
        ),
        ({"usage": {}}, "provider_model_id"),
        (
            {"provider_model_id": "x", "pricing": {"prompt": "free", "completion": "1"}},
            "pricing.prompt",
        ),
        ({"provider_model_id": "openai/gpt-5", "at": "soon"}, "at"),
    ],
)
def test_bad_input_is_422_naming_the_field(
    client: TestClient, payload: dict[str, object], field: str
) -> None:
    response = client.post("/internal/billing/quote", json=payload)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field


@pytest.mark.parametrize("body", [b"{nope", b"[" * 100_000])
def test_body_that_is_not_json_is_400(client: TestClient, body: bytes) -> None:
    response = client.post("/internal/billing/quote", content=body)
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


@pytest.mark.parametrize(
    ("pricing", "usage"),
    [
        ({"prompt": "1E+999999", "completion": "0"}, {"prompt_tokens": 10}),
        ({"prompt": "1E-99999999", "completion": "0"}, {"prompt_tokens": 10}),
        ({"prompt": "0.1", "completion": "0"}, {"prompt_tokens": 10, "cost": "1E+1000000"}),
        ({"prompt": "-1", "completion": "-1"}, {"prompt_tokens": 10}),
    ],
)
def test_out_of_range_money_is_422_not_500(
    client: TestClient, pricing: dict[str, str], usage: dict[str, object]
) -> None:
    payload = {"provider_model_id": "x/y", "pricing": pricing, "usage": usage}
    response = client.post("/internal/billing/quote", json=payload)
    assert response.status_code == 422, response.text
    assert response.json()["field"].startswith(("pricing.prompt", "usage.cost"))


def test_body_that_is_not_an_object_is_422(client: TestClient) -> None:
    response = client.post("/internal/billing/quote", json=[1, 2])
    assert response.status_code == 422
    assert response.json()["field"] == "request"


def test_admin_token_is_enforced_when_set(secured: TestClient) -> None:
    payload = {"provider_model_id": "openai/gpt-5"}
    missing = secured.post("/internal/billing/quote", json=payload)
    assert missing.status_code == 401
    assert "admin token" in missing.json()["error"]
    non_ascii = {"Authorization": "Bearer \u00e9t\u00e9".encode()}
    assert (
        secured.post("/internal/billing/quote", json=payload, headers=non_ascii).status_code == 401
    )
    wrong = {"Authorization": "Bearer nope"}
    assert secured.post("/internal/billing/quote", json=payload, headers=wrong).status_code == 401
    right = {"Authorization": "Bearer s3cret-t0ken"}
    assert secured.post("/internal/billing/quote", json=payload, headers=right).status_code == 200
    assert secured.get("/healthz").status_code == 200


def test_readyz_reports_price_status(client: TestClient) -> None:
    body = client.get("/readyz").json()
    assert body["prices"]["models"] >= 12
    assert body["prices"]["source"] is None
