"""POST /internal/billing/prices and its history, through the FastAPI app."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.adapters.settings import Settings
from services.gateway.app import create_app

pytestmark = pytest.mark.integration
ADMIN = {"Authorization": "Bearer s3cret-t0ken"}
CORRECTION = {
    "model": "openai/gpt-4o-mini",
    "prompt": "0.10",
    "completion": "0.40",
    "per_million": True,
    "effective_from": "2026-03-01T00:00:00Z",
    "reason": "catalogue price was wrong",
    "by": "finance",
}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path / "data", catalogue_sync=False, admin_token="s3cret-t0ken"
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_a_correction_is_a_new_version_with_who_and_why(client: TestClient) -> None:
    assert client.post("/internal/billing/prices", json=CORRECTION).status_code == 401
    created = client.post("/internal/billing/prices", json=CORRECTION, headers=ADMIN)
    assert created.status_code == 201, created.text
    version = created.json()
    assert version["pricing"]["prompt"] == "0.0000001"
    assert version["source"] == "correction by finance"
    assert version["replaces_version"] is not None
    again = client.post("/internal/billing/prices", json=CORRECTION, headers=ADMIN)
    assert again.status_code == 200 and again.json() == {"unchanged": True}

    history = client.get(
        "/internal/billing/prices/history", params={"model": "openai/gpt-4o-mini"}, headers=ADMIN
    ).json()["versions"]
    assert [v["version"] for v in history][-1] == version["version"]
    assert history[-1]["reason"] == "catalogue price was wrong"
    assert history[0]["layer"] == "catalogue"  # the old price is still there

    quote = client.post(
        "/internal/billing/quote",
        json={"provider_model_id": "openai/gpt-4o-mini", "at": "2026-03-02T00:00:00Z"},
        headers=ADMIN,
    ).json()
    assert quote["price_version"] == version["version"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"prompt": "-1"}, "pricing.prompt"),
        ({"effective_from": "yesterday"}, "effective_from"),
        ({"reason": ""}, "pricing.reason"),
        ({"model": ""}, "model"),
    ],
)
def test_bad_corrections_say_which_field(client: TestClient, change: dict, field: str) -> None:  # type: ignore[type-arg]
    response = client.post("/internal/billing/prices", json=CORRECTION | change, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
