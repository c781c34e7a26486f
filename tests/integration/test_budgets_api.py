"""Monthly budgets through the admin API and the CLI, and a tenant's own balance: budgets
stored as sent (or refused naming the field), balances exact to the last digit and each
tenant's numbers its own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner, Result
from fastapi.testclient import TestClient

from services.adapters.credits import add_grant
from services.adapters.settings import Settings
from services.adapters.tenants import create_key, create_tenant
from services.cli.main import main
from services.core.credits import grant_of
from services.core.periods import month_of
from services.gateway.app import create_app

pytestmark = pytest.mark.integration

TOKEN = "adm1n-budg3ts"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
HOUR = timedelta(hours=1)


@dataclass(frozen=True)
class Tenants:
    """Two tenants with one API key each (ids and secrets)."""

    acme_key_id: str
    acme_key: str
    globex_key_id: str
    globex_key: str


async def _on(database_url: str, sql: str, *args: Any) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(sql, *args)
    finally:
        await connection.close()


async def _make_tenants(database_url: str) -> Tenants:
    connection = await asyncpg.connect(database_url)
    try:
        for tenant in ("acme", "globex"):
            await create_tenant(connection, tenant)
        acme = await create_key(connection, "acme", "ci")
        globex = await create_key(connection, "globex", "ci")
    finally:
        await connection.close()
    return Tenants(*acme, *globex)


@pytest.fixture
def tenants(database_url: str) -> Tenants:
    return asyncio.run(_make_tenants(database_url))


@pytest.fixture
def client(database_url: str, tenants: Tenants, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path, catalogue_sync=False, database_url=database_url, admin_token=TOKEN
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _put(client: TestClient, path: str, body: Any, headers: dict[str, str] = ADMIN) -> Any:
    return client.put(f"/internal/billing/budgets/{path}", json=body, headers=headers)


# -- budgets --------------------------------------------------------------------------------------


def test_budgets_are_stored_as_sent_and_listed(client: TestClient, tenants: Tenants) -> None:
    mine = _put(client, "acme", {"monthly_limit": "100.00"})
    assert mine.status_code == 200, mine.text
    assert mine.json() == {
        "tenant_id": "acme",
        "api_key_id": None,
        "monthly_limit": "100.00",
        "hard": True,
        "alerts": [50, 80, 100],
    }
    body = {"monthly_limit": 2.5, "hard": False, "alerts": [90, 25, 90]}  # a number: exact
    key = _put(client, f"acme/keys/{tenants.acme_key_id}", body)
    assert key.status_code == 200, key.text
    assert key.json() == {
        "tenant_id": "acme",
        "api_key_id": tenants.acme_key_id,
        "monthly_limit": "2.5",
        "hard": False,
        "alerts": [25, 90],
    }
    # Replaced, not added.
    again = _put(client, "acme", {"monthly_limit": "80", "alerts": []})
    assert again.json()["monthly_limit"] == "80" and again.json()["alerts"] == []
    listed = client.get("/internal/billing/budgets/acme", headers=ADMIN)
    assert listed.status_code == 200
    assert listed.json() == {"tenant_id": "acme", "budgets": [again.json(), key.json()]}
    empty = client.get("/internal/billing/budgets/globex", headers=ADMIN).json()
    assert empty == {"tenant_id": "globex", "budgets": []}


def test_bad_budgets_are_refused_and_store_nothing(client: TestClient, tenants: Tenants) -> None:
    cases = [
        ("acme", {"monthly_limit": "-1"}, 422, "monthly_limit"),
        ("acme", {"monthly_limit": "ten"}, 422, "monthly_limit"),
        ("acme", {"monthly_limit": "1.0000000001"}, 422, "monthly_limit"),
        ("acme", {}, 422, "monthly_limit"),
        ("acme", {"monthly_limit": "10", "alerts": [0]}, 422, "alerts"),
        ("acme", {"monthly_limit": "10", "alerts": "often"}, 422, "alerts"),
        ("acme", {"monthly_limit": "10", "alerts": [50.5]}, 422, "alerts"),
        ("acme", {"monthly_limit": "10", "hard": "yes"}, 422, "hard"),
        ("nobody", {"monthly_limit": "10"}, 404, None),
        ("acme/keys/no-such-key", {"monthly_limit": "10"}, 404, None),
        (f"acme/keys/{tenants.globex_key_id}", {"monthly_limit": "10"}, 404, None),
    ]
    for path, body, status, field in cases:
        answer = _put(client, path, body)
        assert answer.status_code == status, (path, body, answer.text)
        assert answer.json().get("field") == field, (path, body, answer.text)
    assert _put(client, "acme", [1]).status_code == 422
    broken = client.put("/internal/billing/budgets/acme", content=b"{", headers=ADMIN)
    assert broken.status_code == 400
    assert client.get("/internal/billing/budgets/nobody", headers=ADMIN).status_code == 404
    for budgets in ("acme", "globex"):
        listed = client.get(f"/internal/billing/budgets/{budgets}", headers=ADMIN).json()
        assert listed["budgets"] == []


def test_budgets_take_the_admin_token(client: TestClient, tenants: Tenants) -> None:
    for headers in ({}, bearer(tenants.acme_key), bearer("wrong")):
        assert _put(client, "acme", {"monthly_limit": "1"}, headers).status_code == 401
        assert client.get("/internal/billing/budgets/acme", headers=headers).status_code == 401
    assert client.get("/internal/billing/budgets/acme", headers=ADMIN).json()["budgets"] == []


def test_without_a_database_budgets_are_unavailable(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, catalogue_sync=False, admin_token=TOKEN)
    with TestClient(create_app(settings)) as client:
        assert _put(client, "acme", {"monthly_limit": "1"}).status_code == 503
        assert client.get("/internal/billing/budgets/acme", headers=ADMIN).status_code == 503
        # ... while a bad budget is still refused for what it is.
        assert _put(client, "acme", {"monthly_limit": "x"}).status_code == 422


# -- balances -------------------------------------------------------------------------------------


async def _seed_usage(database_url: str, tenants: Tenants) -> None:
    """acme: 100.00 granted, 12.345000001 spent this month (2.5 of it by its key) and 1000 a
    year ago (the balance counts every month, a budget only its own), budgets
    of 50.00 (hard) and 10 for the key (soft); leases of a gateway, one dead. globex:
    1.5 spent, no grant, no budget."""
    period = month_of(datetime.now(UTC))
    connection = await asyncpg.connect(database_url)
    try:
        grant = grant_of("acme", "100.00", "top-up", now=datetime.now(UTC))
        await add_grant(connection, grant)
        await connection.executemany(
            "INSERT INTO billing_quota_spend (tenant_id, api_key_id, period, spent)"
            " VALUES ($1, $2, $3, $4)",
            [
                ("acme", "", period, Decimal("12.345000001")),
                ("acme", tenants.acme_key_id, period, Decimal("2.5")),
                ("acme", "", date_before(period), Decimal("1000")),  # charged, earlier month
                ("globex", "", period, Decimal("1.5")),
            ],
        )
        month, key = f"{period:%Y-%m}", tenants.acme_key_id
        leases = [
            ("balance/acme", "g1", Decimal("0.75"), Decimal("0.25"), HOUR),
            ("balance/acme", "dead", Decimal("9"), Decimal("9"), -HOUR),
            (f"budget/acme//{month}", "g1", Decimal("0.5"), Decimal("0.1"), HOUR),
            (f"budget/acme/{key}/{month}", "g1", Decimal("0.2"), Decimal(0), HOUR),
            (f"budget/globex//{month}", "g1", Decimal("0.3"), Decimal("0.2"), HOUR),
        ]
        await connection.executemany(
            "INSERT INTO billing_quota_leases"
            " (scope, holder, tenant_id, amount, reserved, pending, expires_at)"
            " VALUES ($1, $2, split_part($1, '/', 2), $3::numeric + $4::numeric + 1, $3, $4,"
            " now() + $5)",
            leases,
        )
        await connection.execute(
            "INSERT INTO billing_budgets (tenant_id, api_key_id, monthly_limit, hard)"
            " VALUES ('acme', '', 50.00, true), ('acme', $1, 10, false)",
            tenants.acme_key_id,
        )
    finally:
        await connection.close()


def date_before(period: date) -> date:
    return period.replace(year=period.year - 1)


def test_a_tenant_key_sees_its_own_balance_exactly(
    client: TestClient, database_url: str, tenants: Tenants
) -> None:
    asyncio.run(_seed_usage(database_url, tenants))
    month = f"{month_of(datetime.now(UTC)):%Y-%m}"
    acme = client.get("/v1/billing/balance", headers=bearer(tenants.acme_key))
    assert acme.status_code == 200, acme.text
    assert acme.json() == {
        "currency": "USD",
        "prepaid": True,
        # 100.00 − 12.345000001 this month − 1000 a year ago
        "balance": "-912.345000001",
        "reserved": "0.75",
        "pending": "0.25",
        "available": "-913.345000001",
        "budget": {
            "period": month,
            "limit": "50",
            "spent": "12.345000001",
            "remaining": "37.054999999",  # 50 − 12.345000001 − 0.5 − 0.1
            "hard": True,
        },
        "key_budget": {
            "period": month,
            "limit": "10",
            "spent": "2.5",
            "remaining": "7.3",
            "hard": False,
        },
    }
    globex = client.get("/v1/billing/balance", headers=bearer(tenants.globex_key))
    assert globex.json() == {
        "currency": "USD",
        "prepaid": False,
        "balance": "-1.5",
        # postpaid: what its budget scope's leases hold (here without a budget row)
        "reserved": "0.3",
        "pending": "0.2",
        "available": "-2",
        "budget": None,
        "key_budget": None,
    }
    sneaky = client.get(
        "/v1/billing/balance",
        params={"tenant_id": "acme"},
        headers=bearer(tenants.globex_key),
    )
    assert sneaky.json() == globex.json()
    for headers in ({}, bearer("bk_nope_nope"), ADMIN):
        assert client.get("/v1/billing/balance", headers=headers).status_code == 401


def test_a_key_without_a_budget_of_its_own_sees_the_tenants(
    client: TestClient, database_url: str, tenants: Tenants
) -> None:
    asyncio.run(_on(database_url, "INSERT INTO billing_budgets VALUES ('globex', '', 5)"))
    grant = grant_of("globex", "3", "promo", now=datetime.now(UTC))

    async def give() -> None:
        connection = await asyncpg.connect(database_url)
        try:
            await add_grant(connection, grant)
        finally:
            await connection.close()

    asyncio.run(give())
    view = client.get("/v1/billing/balance", headers=bearer(tenants.globex_key)).json()
    assert (view["balance"], view["reserved"], view["available"]) == ("3", "0", "3")
    assert view["budget"]["limit"] == "5" and view["budget"]["remaining"] == "5"
    assert view["key_budget"] is None


# -- the CLI ---------------------------------------------------------------------------------------


def _billing(database_url: str, tmp_path: Path, *args: str) -> Result:
    return CliRunner().invoke(
        main,
        ["--data-dir", str(tmp_path), *args],
        env={"BILLING_DATABASE_URL": database_url},
    )


def test_the_cli_sets_shows_budgets_and_balances(
    database_url: str, tenants: Tenants, tmp_path: Path
) -> None:
    def billing(*args: str) -> Result:
        return _billing(database_url, tmp_path, *args)

    made = billing("budgets", "set", "acme", "--monthly-limit", "100.00")
    assert made.exit_code == 0, made.output
    assert "hard budget of 100.00 USD a month set for acme (alerts at 50,80,100%)" in made.output
    key = tenants.acme_key_id
    soft = billing("budgets", "set", "acme", "--monthly-limit", "7.5", "--key", key, "--soft",
                   "--alerts", "80, 100")  # fmt: skip
    assert soft.exit_code == 0, soft.output
    assert f"soft budget of 7.5 USD a month set for key {key} of acme" in soft.output

    for bad, message in [
        (["nobody", "--monthly-limit", "1"], "no tenant 'nobody'"),
        (["acme", "--monthly-limit", "1", "--key", tenants.globex_key_id], "has no API key"),
        (["acme", "--monthly-limit", "-1"], "monthly_limit: must be zero or a positive"),
        (["acme", "--monthly-limit", "1", "--alerts", "50,lots"], "alerts: 'lots' is not"),
    ]:
        refused = billing("budgets", "set", *bad)
        assert refused.exit_code == 1 and message in refused.output, (bad, refused.output)

    shown = json.loads(billing("budgets", "show", "acme", "--json").output)
    assert shown == {
        "tenant_id": "acme",
        "budgets": [
            {
                "tenant_id": "acme",
                "api_key_id": None,
                "monthly_limit": "100.00",
                "hard": True,
                "alerts": [50, 80, 100],
            },
            {
                "tenant_id": "acme",
                "api_key_id": key,
                "monthly_limit": "7.5",
                "hard": False,
                "alerts": [80, 100],
            },
        ],
    }
    table = billing("budgets", "show", "acme").output.splitlines()
    assert table[0].split() == ["budget", "monthly", "USD", "kind", "alerts", "%"]
    assert table[1].split() == ["tenant", "100.00", "hard", "50,80,100"]
    assert table[2].split() == ["key", key, "7.5", "soft", "80,100"]
    assert "globex has no budgets" in billing("budgets", "show", "globex").output
    assert billing("budgets", "show", "nobody").exit_code == 1

    asyncio.run(_on(database_url, "DELETE FROM billing_budgets WHERE tenant_id = 'acme'"))
    asyncio.run(_seed_usage(database_url, tenants))
    balance = billing("balance", "acme", "--json", "--key", key)
    assert balance.exit_code == 0, balance.output
    view = json.loads(balance.output)
    assert (view["balance"], view["reserved"], view["pending"], view["available"]) == (
        "-912.345000001",
        "0.75",
        "0.25",
        "-913.345000001",
    )
    assert view["budget"]["remaining"] == "37.054999999"
    assert view["key_budget"]["remaining"] == "7.3"
    assert json.loads(billing("balance", "acme", "--json").output)["key_budget"] is None
    human = billing("balance", "acme", "--key", key).output.splitlines()
    assert human[0].split() == ["USD", "amount"]
    assert human[1].split() == ["balance", "-912.345000001"]
    assert human[4].split() == ["available", "-913.345000001"]
    assert human[7].split()[2:] == ["50", "12.345000001", "37.054999999", "hard"]
    assert human[8].split()[3:] == ["10", "2.5", "7.3", "soft"]
    postpaid = billing("balance", "globex").output
    assert "no monthly budget" in postpaid and "-1.5" in postpaid
    for args, message in [
        (["nobody"], "no tenant 'nobody'"),
        (["acme", "--key", tenants.globex_key_id], "has no API key"),
    ]:
        refused = billing("balance", *args)
        assert refused.exit_code == 1 and message in refused.output, refused.output
