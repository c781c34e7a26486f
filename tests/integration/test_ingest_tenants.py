"""POST /v1/usage for tenants that do not exist (BILLING_UNKNOWN_TENANTS), the messages a
client gets for missing fields, and the error shape of routes FastAPI answers itself."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from services.adapters.database import connect, migrate
from services.adapters.publisher import InMemoryPublisher
from services.adapters.settings import Settings
from services.core.events import decode_recorded
from services.gateway.app import create_app
from tests.integration.test_ingest import ITEM

pytestmark = pytest.mark.integration


async def tenant_ids(url: str) -> set[str]:
    connection = await connect(url)
    try:
        return {r["tenant_id"] for r in await connection.fetch("SELECT tenant_id FROM tenants")}
    finally:
        await connection.close()


def gateway(
    tmp_path: Path, url: str | None, policy: Literal["create", "reject"]
) -> tuple[TestClient, InMemoryPublisher]:
    settings = Settings(
        data_dir=tmp_path, catalogue_sync=False, database_url=url, unknown_tenants=policy
    )
    publisher = InMemoryPublisher()
    return TestClient(create_app(settings, publisher=publisher)), publisher


def item(request_id: str, tenant: str) -> dict[str, object]:
    return copy.deepcopy(ITEM) | {"request_id": request_id, "tenant_id": tenant}


@pytest.fixture
async def url(empty_database_url: str) -> str:
    await migrate(empty_database_url)
    connection = await connect(empty_database_url)
    try:
        await connection.execute("INSERT INTO tenants (tenant_id) VALUES ('acme')")
    finally:
        await connection.close()
    return empty_database_url


def created_total() -> float:
    return REGISTRY.get_sample_value("billing_tenants_created_total") or 0.0


async def test_unknown_tenants_are_created_and_counted(tmp_path: Path, url: str) -> None:
    before = created_total()
    client, publisher = gateway(tmp_path, url, "create")
    with client:
        answer = client.post("/v1/usage", json=[item("r1", "acme"), item("r2", "newco")])
        again = client.post("/v1/usage", json=[item("r3", "newco")])
    assert answer.status_code == 202 and answer.json()["accepted"] == 2
    assert again.json()["accepted"] == 1
    assert await tenant_ids(url) == {"acme", "newco"}
    assert created_total() - before == 1  # newco, once
    sent = [decode_recorded(v).request_id for v in publisher.values()]
    assert sent == ["r1", "r2", "r3"]


async def test_unknown_tenants_are_rejected_by_name(tmp_path: Path, url: str) -> None:
    client, publisher = gateway(tmp_path, url, "reject")
    with client:
        answer = client.post(
            "/v1/usage", json=[item("r1", "acme"), item("r2", "newco"), item("r3", "acme")]
        )
        alone = client.post("/v1/usage", json=item("r4", "newco"))
    body = answer.json()
    assert answer.status_code == 202 and (body["accepted"], body["rejected"]) == (2, 1)
    assert [r["status"] for r in body["results"]] == ["accepted", "rejected", "accepted"]
    assert body["results"][1]["field"] == "tenant_id"
    assert "no tenant 'newco'" in body["results"][1]["error"]
    assert alone.status_code == 422
    assert [decode_recorded(v).request_id for v in publisher.values()] == ["r1", "r3"]
    assert await tenant_ids(url) == {"acme"}


async def test_ids_no_tenant_can_have_are_refused_when_tenants_are_kept(
    tmp_path: Path, url: str
) -> None:
    client, publisher = gateway(tmp_path, url, "create")
    with client:
        answer = client.post("/v1/usage", json=[item("r1", "Big Corp"), item("r2", "acme")])
    body = answer.json()
    assert (body["accepted"], body["rejected"]) == (1, 1)
    assert body["results"][0]["field"] == "tenant_id"
    assert "cannot be a tenant id" in body["results"][0]["error"]
    assert await tenant_ids(url) == {"acme"}
    assert [decode_recorded(v).request_id for v in publisher.values()] == ["r2"]


async def test_a_database_that_does_not_answer_does_not_stall_ingest(
    tmp_path: Path, url: str
) -> None:
    """With tenants created on the fly, usage is taken when the look-up fails or hangs."""
    client, publisher = gateway(tmp_path, url, "create")
    with client:
        store = client.app.state.resources.tenants  # type: ignore[attr-defined]
        store.timeout = 0.2
        pool = store.pool
        store.pool = SimpleNamespace(acquire=_Hanging)  # no connection ever comes
        started = time.monotonic()
        answer = client.post("/v1/usage", json=item("r9", "newco"))
        elapsed = time.monotonic() - started
        store.pool = pool
    assert answer.status_code == 202 and answer.json()["accepted"] == 1
    assert elapsed < 3
    assert [decode_recorded(v).request_id for v in publisher.values()] == ["r9"]


class _Hanging:
    """A pool connection that never comes (a database that stopped answering)."""

    async def __aenter__(self) -> None:
        await asyncio.sleep(30)

    async def __aexit__(self, *exc: object) -> None:
        return None


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    test_client, _ = gateway(tmp_path, None, "create")
    with test_client:
        yield test_client


@pytest.mark.parametrize("field", ["request_id", "tenant_id", "provider", "provider_model_id"])
def test_a_missing_field_is_said_to_be_required(client: TestClient, field: str) -> None:
    incomplete = {k: v for k, v in ITEM.items() if k != field}
    [result] = client.post("/v1/usage", json=incomplete).json()["results"]
    assert (result["field"], result["error"]) == (field, f"{field}: is required")


def test_a_null_usage_is_said_to_be_required(client: TestClient) -> None:
    [result] = client.post("/v1/usage", json=ITEM | {"usage": None}).json()["results"]
    assert result["field"] == "usage" and "is required" in result["error"]
    [listed] = client.post("/v1/usage", json=ITEM | {"usage": [1]}).json()["results"]
    assert listed["error"] == "usage: must be an object, got an array"


def test_wrong_method_and_unknown_route_answer_in_the_error_shape(client: TestClient) -> None:
    wrong = client.get("/internal/billing/quote")
    assert wrong.status_code == 405
    assert wrong.json() == {"error": "GET is not allowed on /internal/billing/quote (use POST)"}
    missing = client.get("/internal/billing/nothing")
    assert missing.status_code == 404 and missing.json() == {
        "error": "no such route: /internal/billing/nothing"
    }
    bad_query = client.get("/internal/billing/summary")  # tenant_id is required
    assert bad_query.status_code in (422, 503)
    assert "error" in bad_query.json()
