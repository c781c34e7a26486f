"""Prepaid credit grants through the HTTP API and the CLI: recorded once per idempotency key,
never changed, refused with the field or the reason named."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from fastapi.testclient import TestClient

from services.adapters.settings import Settings
from services.gateway.app import create_app
from tests.integration.test_tenant_keys import cli

pytestmark = pytest.mark.integration

TOKEN = "adm1n-cr3dits"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    assert cli(database_url, "tenants", "create", "acme").returncode == 0
    settings = Settings(
        data_dir=tmp_path, catalogue_sync=False, database_url=database_url, admin_token=TOKEN
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


async def stored(database_url: str) -> list[tuple[str, Decimal]]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT tenant_id, amount FROM billing_credit_grants ORDER BY grant_id"
        )
    finally:
        await connection.close()
    return [(r["tenant_id"], r["amount"]) for r in rows]


async def test_a_grant_is_recorded_once_per_idempotency_key(
    client: TestClient, database_url: str
) -> None:
    grant = {
        "tenant_id": "acme",
        "amount": "25.000000001",
        "reason": "top-up",
        "idempotency_key": "inv-1",
    }
    first = client.post("/internal/billing/credits", json=grant, headers=ADMIN)
    again = client.post("/internal/billing/credits", json=grant, headers=ADMIN)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json() == again.json()
    assert first.json()["amount"] == "25.000000001" and first.json()["expires_at"] is None
    other = client.post("/internal/billing/credits", json=grant | {"amount": "30"}, headers=ADMIN)
    assert other.status_code == 409 and "inv-1" in other.json()["error"]
    # No key: every grant is its own; a JSON number is read exactly.
    body = (
        b'{"tenant_id": "acme", "amount": 0.1, "reason": "promo",'
        b' "expires_at": "2099-01-01T00:00:00Z"}'
    )
    for _ in range(2):
        promo = client.post("/internal/billing/credits", content=body, headers=ADMIN)
        assert promo.status_code == 201 and promo.json()["amount"] == "0.1"
    assert await stored(database_url) == [
        ("acme", Decimal("25.000000001")),
        ("acme", Decimal("0.1")),
        ("acme", Decimal("0.1")),
    ]


def test_bad_grants_are_refused_and_record_nothing(client: TestClient, database_url: str) -> None:
    cases = [
        ({"tenant_id": "acme", "amount": "-5", "reason": "x"}, 422, "amount"),
        ({"tenant_id": "acme", "amount": "5"}, 422, "reason"),
        (
            {
                "tenant_id": "acme",
                "amount": "5",
                "reason": "x",
                "expires_at": "2000-01-01T00:00:00Z",
            },
            422,
            "expires_at",
        ),
        ({"tenant_id": "nobody", "amount": "5", "reason": "x"}, 404, None),
    ]
    for body, status, field in cases:
        answer = client.post("/internal/billing/credits", json=body, headers=ADMIN)
        assert answer.status_code == status, (body, answer.text)
        assert answer.json().get("field") == field
    assert client.post("/internal/billing/credits", content=b"{", headers=ADMIN).status_code == 400
    unauthorised = client.post(
        "/internal/billing/credits", json={"tenant_id": "acme", "amount": "5", "reason": "x"}
    )
    assert unauthorised.status_code == 401
    assert asyncio.run(stored(database_url)) == []


def test_the_cli_adds_and_lists_grants(database_url: str) -> None:
    assert cli(database_url, "tenants", "create", "globex").returncode == 0
    add = ["credits", "add", "globex", "12.50", "--reason", "top-up", "--idempotency-key", "k1"]
    first, again = cli(database_url, *add), cli(database_url, *add)
    assert first.returncode == 0 and "granted 12.50 USD to globex" in first.stdout
    assert again.returncode == 0 and "already granted" in again.stdout
    clash = cli(database_url, "credits", "add", "globex", "13", "--reason", "top-up",
                "--idempotency-key", "k1")  # fmt: skip
    assert clash.returncode == 1 and "was used for another grant" in clash.stderr
    bad = cli(database_url, "credits", "add", "globex", "1e-12", "--reason", "x")
    assert bad.returncode == 1 and "amount: has more than 9 decimal places" in bad.stderr
    promo = cli(database_url, "credits", "add", "globex", "5", "--reason", "launch promo",
                "--expires-at", "2099-01-01T00:00:00Z")  # fmt: skip
    assert promo.returncode == 0, promo.stderr
    listed = json.loads(cli(database_url, "credits", "list", "globex", "--json").stdout)
    assert [(g["amount"], g["reason"], g["expires_at"]) for g in listed] == [
        ("12.50", "top-up", None),
        ("5", "launch promo", "2099-01-01T00:00:00Z"),
    ]
    table = cli(database_url, "credits", "list", "globex").stdout
    assert "launch promo" in table and table.splitlines()[0].split()[:2] == ["grant", "amount"]
