"""GET /internal/billing/transactions and /summary over real projected rows."""

from __future__ import annotations

import random
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from fastapi.testclient import TestClient

from services.adapters.database import init_connection
from services.adapters.settings import Settings
from services.core.pricebook import InMemoryPriceBook
from services.core.rating import rate
from services.gateway.app import create_app
from services.projector.apply import apply_batch
from tests.integration.test_projector_apply import T0, recorded

pytestmark = pytest.mark.integration


@pytest.fixture
async def seeded(database_url: str, snapshot_book: InMemoryPriceBook) -> str:
    rng = random.Random(3)
    events = [rate(recorded(n, rng), snapshot_book, priced_at=T0) for n in range(120)]
    # Two requests that named gpt-5 by a provider's own id (priced under the canonical one).
    for n in (1, 4):
        events[n] = events[n].model_copy(update={"provider_model_id": "gpt-5-provider-id"})
    connection = await asyncpg.connect(database_url)
    await init_connection(connection)
    try:
        await apply_batch(connection, "projector", events, {})
    finally:
        await connection.close()
    return database_url


@pytest.fixture
def client(seeded: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path, catalogue_sync=False, database_url=seeded)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_transactions_page_newest_first_without_gaps_or_repeats(client: TestClient) -> None:
    seen: list[dict[str, str]] = []
    cursor = None
    while True:
        params = {"tenant_id": "tenant-1", "limit": 7} | ({"cursor": cursor} if cursor else {})
        body = client.get("/internal/billing/transactions", params=params).json()
        seen.extend(body["transactions"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 40  # every third of 120 requests
    assert len({t["request_id"] for t in seen}) == 40
    keys = [(t["occurred_at"], t["request_id"]) for t in seen]
    assert keys == sorted(keys, reverse=True)
    assert all(isinstance(t["total_cost"], str) for t in seen)


def test_filters(client: TestClient) -> None:
    by_key = client.get(
        "/internal/billing/transactions",
        params={"tenant_id": "tenant-1", "api_key_id": "key-0", "model": "openai/gpt-5"},
    ).json()["transactions"]
    assert by_key and all(
        t["api_key_id"] == "key-0" and t["model"] == "openai/gpt-5" for t in by_key
    )
    by_model = {
        name: {
            t["request_id"]
            for t in client.get(
                "/internal/billing/transactions",
                params={"tenant_id": "tenant-1", "model": name, "limit": 100},
            ).json()["transactions"]
        }
        for name in ("openai/gpt-5", "gpt-5-provider-id", "no-such-model")
    }
    assert by_model["gpt-5-provider-id"] == {"req-1", "req-4"}
    assert by_model["gpt-5-provider-id"] < by_model["openai/gpt-5"]
    assert by_model["no-such-model"] == set()
    window = client.get(
        "/internal/billing/transactions",
        params={
            "tenant_id": "tenant-1",
            "since": "2026-11-02T00:00:00Z",
            "until": "2026-11-02T12:00:00Z",
        },
    ).json()["transactions"]
    assert window and all("2026-11-02T" in t["occurred_at"] for t in window)


@pytest.mark.parametrize("group_by", ["model", "day", "api_key"])
def test_summary_equals_the_sum_of_its_transactions(client: TestClient, group_by: str) -> None:
    summary = client.get(
        "/internal/billing/summary",
        params={
            "tenant_id": "tenant-2",
            "since": "2026-11-01",
            "until": "2026-11-03",
            "group_by": group_by,
        },
    ).json()
    rows = []
    cursor = None
    while True:
        params = {
            "tenant_id": "tenant-2",
            "since": "2026-11-01T00:00:00Z",
            "until": "2026-11-03T00:00:00Z",
            "limit": 1000,
        }
        body = client.get(
            "/internal/billing/transactions", params=params | ({"cursor": cursor} if cursor else {})
        ).json()
        rows.extend(body["transactions"])
        if (cursor := body["next_cursor"]) is None:
            break
    assert summary["totals"]["requests"] == len(rows)
    assert Decimal(summary["totals"]["total_cost"]) == sum(Decimal(t["total_cost"]) for t in rows)
    assert sum(Decimal(r["total_cost"]) for r in summary["rows"]) == Decimal(
        summary["totals"]["total_cost"]
    )
    assert summary["group_by"] == group_by


def test_bad_query_parameters_are_422(client: TestClient) -> None:
    assert client.get("/internal/billing/transactions").status_code == 422  # tenant_id missing
    bad_cursor = client.get(
        "/internal/billing/transactions", params={"tenant_id": "t", "cursor": "%%"}
    )
    assert bad_cursor.status_code == 422
    naive = client.get(
        "/internal/billing/transactions", params={"tenant_id": "t", "since": "2026-11-01T00:00:00"}
    )
    assert naive.status_code == 422
    assert (
        client.get(
            "/internal/billing/summary", params={"tenant_id": "t", "group_by": "x"}
        ).status_code
        == 422
    )


def test_queries_without_a_database_are_503(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(data_dir=tmp_path, catalogue_sync=False))) as client:
        response = client.get("/internal/billing/summary", params={"tenant_id": "t"})
    assert response.status_code == 503
    assert "BILLING_DATABASE_URL" in response.json()["error"]


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/internal/billing/transactions", {"tenant_id": "a\x00b"}),
        ("/internal/billing/transactions", {"tenant_id": "t", "model": "m\x00"}),
        (
            "/internal/billing/transactions",
            {"tenant_id": "t", "since": "0001-01-01T00:00:00+01:00"},
        ),
        ("/internal/billing/summary", {"tenant_id": "\x00"}),
        ("/internal/billing/transactions", {"tenant_id": "t", "limit": "0"}),
    ],
)
def test_hostile_parameters_are_422_with_an_error_body(
    client: TestClient, path: str, params: dict[str, str]
) -> None:
    response = client.get(path, params=params)
    assert response.status_code == 422, response.text
    assert "error" in response.json()
