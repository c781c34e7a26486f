"""Admission at the gateway (issue #11): who is limited, by what, and what a refusal looks like.

The gateway runs in-process before the fake upstream (``test_proxy``'s set-up); limits are
written straight into the tables the quota service and the admin API maintain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from services.adapters.credits import add_grant
from services.adapters.database import init_connection
from services.adapters.quota import set_budget
from services.adapters.tenants import create_key
from services.core.credits import grant_of
from services.core.periods import add_months, month_of
from services.core.quota import budget_of
from tests.integration.test_proxy import CHAT, Setup, gateway_before_fake_upstream

pytestmark = pytest.mark.integration

LIMITED = CHAT | {"max_tokens": 100}  # gpt-4o-mini: ≈ $0.00007 at worst


async def _sql(database_url: str, action: Any) -> Any:
    connection = await asyncpg.connect(database_url)
    await init_connection(connection)
    try:
        return await action(connection)
    finally:
        await connection.close()


def run(database_url: str, action: Any) -> Any:
    return asyncio.run(_sql(database_url, action))


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def gateway(
    database_url: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> Iterator[Setup]:
    with gateway_before_fake_upstream(
        database_url, kafka_bootstrap, topic_prefix, tmp_path, lease_refresh_seconds=0.2
    ) as setup:
        yield setup


@pytest.fixture
def strict(
    database_url: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> Iterator[Setup]:
    with gateway_before_fake_upstream(
        database_url, kafka_bootstrap, topic_prefix, tmp_path, require_credits=True
    ) as setup:
        yield setup


def test_a_tenant_without_credits_or_budgets_is_unlimited(gateway: Setup) -> None:
    client, transport, key, _ = gateway
    answers = [
        client.post(
            "/v1/chat/completions", json=LIMITED, headers={"Authorization": f"Bearer {key}"}
        )
        for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert len(transport.requests) == 3


def test_require_credits_refuses_a_tenant_without_any(strict: Setup) -> None:
    client, transport, key, _ = strict
    answer = client.post(
        "/v1/chat/completions", json=LIMITED, headers={"Authorization": f"Bearer {key}"}
    )
    assert answer.status_code == 402
    error = answer.json()["error"]
    assert error["type"] == "insufficient_quota" and error["code"] == 402
    assert "prepaid credit" in error["message"]
    assert transport.requests == []  # never sent upstream


def test_a_hard_key_budget_stops_that_key_only_and_a_soft_one_only_alerts(
    gateway: Setup, database_url: str
) -> None:
    client, transport, key, _ = gateway
    other_id, other = run(database_url, lambda c: create_key(c, "acme", "second"))

    def budget(limit: str, *, hard: bool) -> None:
        run(
            database_url,
            lambda c: set_budget(c, budget_of("acme", limit, api_key_id=other_id, hard=hard)),
        )

    budget("0.00001", hard=True)  # below one request's worst case
    refused = client.post(
        "/v1/chat/completions", json=LIMITED, headers={"Authorization": f"Bearer {other}"}
    )
    assert refused.status_code == 402
    assert other_id in refused.json()["error"]["message"]
    allowed = client.post(
        "/v1/chat/completions", json=LIMITED, headers={"Authorization": f"Bearer {key}"}
    )
    assert allowed.status_code == 200
    assert len(transport.requests) == 1

    budget("0.00001", hard=False)
    client.app.state.resources.admission._policies.clear()  # (cached for 5 s otherwise)
    soft = client.post(
        "/v1/chat/completions", json=LIMITED, headers={"Authorization": f"Bearer {other}"}
    )
    assert soft.status_code == 200


def test_a_tenant_budget_counts_this_months_spend_only(gateway: Setup, database_url: str) -> None:
    client, _, key, _ = gateway
    this_month = month_of(datetime.now(UTC))
    run(database_url, lambda c: set_budget(c, budget_of("acme", "10")))

    async def spend(connection: asyncpg.Connection, period: object, amount: str) -> None:
        await connection.execute(
            "INSERT INTO billing_quota_spend (tenant_id, api_key_id, period, spent)"
            " VALUES ('acme', '', $1, $2) ON CONFLICT (tenant_id, api_key_id, period)"
            " DO UPDATE SET spent = EXCLUDED.spent",
            period,
            Decimal(amount),
        )

    run(database_url, lambda c: spend(c, add_months(this_month, -1), "10"))  # last month: full
    auth = {"Authorization": f"Bearer {key}"}
    assert client.post("/v1/chat/completions", json=LIMITED, headers=auth).status_code == 200
    run(database_url, lambda c: spend(c, this_month, "9.99999"))
    resources = client.app.state.resources
    for _ in range(3):  # a busy round, then two quiet ones: the lease hands back its headroom
        client.portal.call(resources.admission.upkeep)
    answer = client.post("/v1/chat/completions", json=LIMITED, headers=auth)
    assert answer.status_code == 402
    assert "monthly budget" in answer.json()["error"]["message"]


def test_the_reservation_becomes_pending_then_settles_when_charged(
    gateway: Setup, database_url: str
) -> None:
    client, _, key, _ = gateway
    grant = grant_of("acme", "5", "test", now=datetime.now(UTC))
    run(database_url, lambda c: add_grant(c, grant))
    answer = client.post(
        "/v1/chat/completions", json=LIMITED, headers={"Authorization": f"Bearer {key}"}
    )
    assert answer.status_code == 200
    request_id = answer.headers["x-billing-request-id"]
    admission = client.app.state.resources.admission
    (lease,) = admission._leases.values()
    assert lease.reserved == 0
    assert 0 < lease.pending < Decimal("0.0001")  # the answer's cost, below the reservation

    async def charge(connection: asyncpg.Connection) -> None:
        await connection.execute(
            "INSERT INTO billing_credit_charges (request_id, revision, tenant_id, period, amount)"
            " VALUES ($1, 1, 'acme', $2, $3)",
            request_id,
            month_of(datetime.now(UTC)),
            lease.pending,
        )

    run(database_url, charge)
    client.portal.call(admission.upkeep)
    assert lease.pending == 0 and lease.reserved == 0

    async def stored(connection: asyncpg.Connection) -> list[Any]:
        return list(await connection.fetch("SELECT reserved, pending FROM billing_quota_leases"))

    rows = run(database_url, stored)
    assert [(r["reserved"], r["pending"]) for r in rows] == [(0, 0)]


@pytest.fixture
def strict_with_gemini(
    database_url: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> Iterator[Setup]:
    with gateway_before_fake_upstream(
        database_url,
        kafka_bootstrap,
        topic_prefix,
        tmp_path,
        require_credits=True,
        vertex_base_url="http://gemini.test",
    ) as setup:
        yield setup


def test_the_gemini_routes_are_admitted_alike_and_refusals_are_counted(
    strict_with_gemini: Setup, database_url: str
) -> None:
    client, transport, key, _ = strict_with_gemini
    body = {
        "contents": [{"role": "user", "parts": [{"text": "hello"}]}],
        "generationConfig": {"maxOutputTokens": 64},
    }
    path = "/v1beta/models/gemini-2.5-flash:generateContent"
    before = {o: _reservations(o) for o in ("refused", "made")}
    refused = client.post(path, json=body, headers={"x-goog-api-key": key})
    assert refused.status_code == 402
    assert refused.json()["error"]["status"] == "RESOURCE_EXHAUSTED"  # Google's field
    assert transport.requests == []

    grant = grant_of("acme", "1", "test", now=datetime.now(UTC))
    run(database_url, lambda c: add_grant(c, grant))
    client.app.state.resources.admission._policies.clear()
    admitted = client.post(path, json=body, headers={"x-goog-api-key": key})
    assert admitted.status_code == 200, admitted.text
    assert len(transport.requests) == 1
    assert {o: _reservations(o) - n for o, n in before.items()} == {"refused": 1, "made": 1}
    assert "billing_quota_reservations_total" in client.get("/metrics").text


def _reservations(outcome: str) -> float:
    value = REGISTRY.get_sample_value("billing_quota_reservations_total", {"outcome": outcome})
    return value or 0.0


def test_a_lease_whose_row_expired_is_taken_again_under_the_lock_not_renewed(
    gateway: Setup, database_url: str
) -> None:
    """A renewal never brings back a row that expired (other gateways stopped counting it,
    so its headroom may have been leased again): the lease is refilled, cap checked."""
    client, _, key, _ = gateway
    grant = grant_of("acme", "5", "test", now=datetime.now(UTC))
    run(database_url, lambda c: add_grant(c, grant))
    auth = _auth(key)
    assert client.post("/v1/chat/completions", json=LIMITED, headers=auth).status_code == 200
    admission = client.app.state.resources.admission
    (lease,) = admission._leases.values()

    async def expire(connection: asyncpg.Connection) -> None:  # the upkeep was held up
        await connection.execute(
            "UPDATE billing_quota_leases SET expires_at = now() - interval '1 second'"
        )

    async def live(connection: asyncpg.Connection) -> int:
        return int(
            await connection.fetchval(
                "SELECT count(*) FROM billing_quota_leases WHERE expires_at > now()"
            )
        )

    run(database_url, expire)
    refills = REGISTRY.get_sample_value("billing_quota_lease_refills_total") or 0.0
    client.portal.call(admission.upkeep)
    deadline = time.monotonic() + 5
    while run(database_url, live) == 0:  # taken again by a refill, in the background
        assert time.monotonic() < deadline, "the expired lease was not taken again"
        time.sleep(0.05)
    assert (REGISTRY.get_sample_value("billing_quota_lease_refills_total") or 0.0) > refills

    # A lease this process has not written for too long is not reserved against either.
    lease.valid_until = 0.0
    before = REGISTRY.get_sample_value("billing_quota_lease_refills_total") or 0.0
    assert client.post("/v1/chat/completions", json=LIMITED, headers=auth).status_code == 200
    assert (REGISTRY.get_sample_value("billing_quota_lease_refills_total") or 0.0) > before
    assert not lease.stale(time.monotonic())
