"""The dashboard's sign-in, session and data routes through HTTP, against real PostgreSQL
(the browser tests in tests/e2e drive the same pages in Chromium).

A session is signed in through the form (CSRF cookie and field), carried by an HttpOnly,
SameSite=Strict cookie, and ended by sign-out, expiry or a revoked key; a tenant's session
sees its own numbers only — equal to the billing API's — and every other tenant's id,
request or invoice is 404; the operator sees every tenant.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from fastapi.testclient import TestClient

from services.adapters.database import init_connection
from services.adapters.settings import Settings
from services.adapters.tenants import create_key, create_tenant, revoke_key
from services.core.pricebook import InMemoryPriceBook
from services.core.rating import rate
from services.gateway.app import create_app
from services.gateway.dashboard.session import CSRF_COOKIE, SESSION_COOKIE
from services.projector.apply import apply_batch
from tests.integration.test_projector_apply import recorded

pytestmark = pytest.mark.integration

TOKEN = "dashb0ard-0perator-t0ken"


@dataclass(frozen=True)
class World:
    acme_key: str
    acme_key_id: str
    globex_key: str
    request_ids: dict[str, list[str]]
    """Each tenant's request ids."""


async def _seed(database_url: str, book: InMemoryPriceBook) -> World:
    """Two tenants with a key each and 40 priced requests over the last 20 hours."""
    now = datetime.now(UTC)
    rng = random.Random(7)
    events = []
    for n in range(40):
        fact = recorded(n, rng).model_copy(
            update={
                "tenant_id": "acme" if n % 2 else "globex",
                "occurred_at": now - timedelta(minutes=30 * n),
                "recorded_at": now - timedelta(minutes=30 * n),
            }
        )
        events.append(rate(fact, book, priced_at=now))
    connection = await asyncpg.connect(database_url)
    await init_connection(connection)
    try:
        for tenant in ("acme", "globex"):
            await create_tenant(connection, tenant)
        acme_id, acme = await create_key(connection, "acme", "web")
        _, globex = await create_key(connection, "globex", "web")
        await apply_batch(connection, "projector", events, {})
    finally:
        await connection.close()
    ids: dict[str, list[str]] = {"acme": [], "globex": []}
    for event in events:
        ids[event.tenant_id].append(event.request_id)
    return World(acme, acme_id, globex, ids)


@pytest.fixture
def world(database_url: str, snapshot_book: InMemoryPriceBook) -> World:
    return asyncio.run(_seed(database_url, snapshot_book))


def _client(database_url: str, tmp_path: Path, **settings: Any) -> TestClient:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "catalogue_sync": False,
        "database_url": database_url,
        "admin_token": TOKEN,
    } | settings
    return TestClient(create_app(Settings(**values)), base_url="http://testserver")


@pytest.fixture
def client(database_url: str, world: World, tmp_path: Path) -> Iterator[TestClient]:
    with _client(database_url, tmp_path) as test_client:
        yield test_client


def sign_in(client: TestClient, credential: str) -> Any:
    """Fill the sign-in form as a browser does (its CSRF cookie and hidden field)."""
    client.cookies.clear()
    form = client.get("/dashboard")
    assert form.status_code == 200
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token is not None
    return client.post(
        "/dashboard/sign-in",
        data={"csrf": token.group(1), "credential": credential},
        headers={"origin": "http://testserver"},
        follow_redirects=False,
    )


def use_cookie(client: TestClient, value: str) -> None:
    """Replace the client's cookies by one session cookie (a copied or altered one)."""
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, value, path="/dashboard")


def test_a_tenant_signs_in_and_its_session_cookie_is_httponly_strict_and_expiring(
    client: TestClient, world: World
) -> None:
    response = sign_in(client, world.acme_key)
    assert response.status_code == 303 and response.headers["location"] == "/dashboard"
    cookie = next(
        c for c in response.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)
    )
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
    assert {"httponly", "samesite", "path", "max-age"} <= attributes
    assert "samesite=strict" in cookie.lower() and "path=/dashboard" in cookie.lower()
    assert "max-age=28800" in cookie.lower()  # BILLING_SESSION_HOURS=8
    assert world.acme_key not in cookie  # a random session id, signed: never the key
    page = client.get("/dashboard")
    assert page.status_code == 200 and 'data-view="tenant"' in page.text
    assert world.acme_key not in page.text
    for header in ("content-security-policy", "x-frame-options"):
        assert header in page.headers
    assert page.headers["cache-control"] == "no-store"


def test_the_month_on_the_page_and_in_the_api_equals_the_billing_summary(
    client: TestClient, world: World
) -> None:
    sign_in(client, world.acme_key)
    overview = client.get("/dashboard/api/overview").json()
    month = overview["month"]["start"]
    summary = client.get(
        "/v1/billing/summary",
        params={"since": month},
        headers={"Authorization": f"Bearer {world.acme_key}"},
    ).json()
    assert Decimal(overview["month"]["exact"]) == Decimal(summary["totals"]["total_cost"])
    assert overview["month"]["requests"] == summary["totals"]["requests"]
    page = client.get("/dashboard").text
    assert f'data-exact="{overview["month"]["exact"]}"' in page
    cents = Decimal(summary["totals"]["total_cost"]).quantize(Decimal("0.01"))
    assert f">${cents:,}<" in page or Decimal(summary["totals"]["total_cost"]) < Decimal("0.01")


def test_the_chart_breakdowns_and_transactions_are_the_tenants_own(
    client: TestClient, world: World
) -> None:
    sign_in(client, world.acme_key)
    series = client.get("/dashboard/api/series", params={"step": "hour", "window": "24h"})
    points = series.json()["points"]
    assert len(points) == 24
    assert sum(p["requests"] for p in points) == len(world.request_ids["acme"])
    by_day = client.get("/dashboard/api/series", params={"step": "day", "window": "30d"})
    assert len(by_day.json()["points"]) == 30
    total = sum(Decimal(p["exact"]) for p in points)
    assert total == sum(Decimal(p["exact"]) for p in by_day.json()["points"])
    models = client.get("/dashboard/api/breakdown", params={"by": "model"}).json()["rows"]
    keys = client.get("/dashboard/api/breakdown", params={"by": "api_key"}).json()["rows"]
    assert sum(r["requests"] for r in models) == sum(r["requests"] for r in keys) == 20

    seen: list[str] = []
    cursor = None
    while True:  # keyset pages of 7 walk every transaction once, newest first
        params = {"limit": "7"} | ({"cursor": cursor} if cursor else {})
        page = client.get("/dashboard/api/transactions", params=params).json()
        seen += [t["request_id"] for t in page["transactions"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == world.request_ids["acme"]  # seeded newest first
    detail = client.get(f"/dashboard/api/transactions/{seen[0]}").json()
    assert detail["request_id"] == seen[0] and detail["revisions"] == []
    assert {"prompt_tokens", "cache_read_tokens", "reasoning_tokens", "price_version"} <= set(
        detail
    )
    assert detail["total_cost"]["exact"] and detail["total_cost"]["shown"].startswith("$")


def test_another_tenants_ids_requests_and_pages_are_404_with_a_tenant_session(
    client: TestClient, world: World
) -> None:
    sign_in(client, world.acme_key)
    theirs = world.request_ids["globex"][0]
    for path in (
        "/dashboard/api/overview?tenant_id=globex",
        "/dashboard/api/series?tenant_id=globex",
        "/dashboard/api/breakdown?tenant_id=globex",
        "/dashboard/api/transactions?tenant_id=globex",
        f"/dashboard/api/transactions/{theirs}",
        f"/dashboard/api/transactions/{theirs}?tenant_id=globex",
        "/dashboard/api/invoices?tenant_id=globex",
        "/dashboard/invoices/INV-2026-11-000001.pdf?tenant_id=globex",
        "/dashboard/tenants/globex",
        "/dashboard/api/operator/tenants",
        "/dashboard/api/operator/pipeline",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        told = response.text.replace(path.split("?")[0], "").replace("tenant_id=globex", "")
        assert "globex" not in told and theirs not in told, path  # only the path is echoed
    mine = client.get("/dashboard/api/transactions").json()["transactions"]
    assert {t["request_id"] for t in mine} <= set(world.request_ids["acme"])


def test_the_operator_sees_every_tenant_and_each_tenants_page(
    client: TestClient, world: World
) -> None:
    assert sign_in(client, TOKEN).status_code == 303
    page = client.get("/dashboard")
    assert 'data-view="operator"' in page.text and TOKEN not in page.text
    ranked = client.get("/dashboard/api/operator/tenants").json()
    assert {t["tenant_id"] for t in ranked["tenants"]} == {"acme", "globex"}
    months = [Decimal(t["month"]["exact"]) for t in ranked["tenants"]]
    assert months == sorted(months, reverse=True)
    assert Decimal(ranked["month_total"]["exact"]) == sum(months)
    pipeline = client.get("/dashboard/api/operator/pipeline").json()
    assert pipeline["configured"] is False and pipeline["unpriced"] == []
    assert client.get("/dashboard/api/operator/changes").status_code == 200
    drift = client.get("/dashboard/api/operator/drift").json()
    assert drift["counts"]["transactions"] >= 1
    globex = client.get("/dashboard/api/overview", params={"tenant_id": "globex"}).json()
    assert globex["tenant_id"] == "globex"
    assert client.get("/dashboard/api/overview").status_code == 422  # which tenant?
    assert 'data-tenant="globex"' in client.get("/dashboard/tenants/globex").text


def test_a_wrong_key_shows_an_error_and_no_data(client: TestClient, world: World) -> None:
    for wrong in (world.acme_key + "x", "bk_nope", "adm1n"):
        response = sign_in(client, wrong)
        assert response.status_code == 401
        assert "unknown or revoked" in response.text
        assert wrong not in response.text  # the key is not echoed into the page
        assert SESSION_COOKIE not in response.headers.get("set-cookie", "").split("=")[0]
        assert client.get("/dashboard/api/overview").status_code == 401
    assert "acme" not in client.get("/dashboard").text


def test_forms_without_their_csrf_token_or_from_another_site_are_refused(
    client: TestClient, world: World
) -> None:
    client.get("/dashboard")
    forged = client.post(
        "/dashboard/sign-in",
        data={"csrf": "forged", "credential": world.acme_key},
        follow_redirects=False,
    )
    assert forged.status_code == 400 and client.cookies.get(SESSION_COOKIE) is None
    page = client.get("/dashboard")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    cross = client.post(
        "/dashboard/sign-in",
        data={"csrf": token.group(1), "credential": world.acme_key},
        headers={"origin": "https://evil.example"},
        follow_redirects=False,
    )
    assert cross.status_code == 403
    client.cookies.delete(CSRF_COOKIE, path="/dashboard")  # the form's cookie half is gone
    no_cookie = client.post(
        "/dashboard/sign-in",
        data={"csrf": token.group(1), "credential": world.acme_key},
        follow_redirects=False,
    )
    assert no_cookie.status_code == 400
    assert sign_in(client, world.acme_key).status_code == 303
    refused = client.post("/dashboard/sign-out", data={"csrf": "x"}, follow_redirects=False)
    assert refused.status_code == 403
    assert client.get("/dashboard/api/overview").status_code == 200  # still signed in


def test_sign_out_ends_the_session_even_for_a_copy_of_its_cookie(
    client: TestClient, world: World
) -> None:
    sign_in(client, world.acme_key)
    cookie = client.cookies.get(SESSION_COOKIE)
    assert cookie is not None
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/dashboard").text)
    assert token is not None
    out = client.post("/dashboard/sign-out", data={"csrf": token.group(1)}, follow_redirects=False)
    assert out.status_code == 303
    use_cookie(client, cookie)  # replayed
    assert client.get("/dashboard/api/overview").status_code == 401
    assert 'name="credential"' in client.get("/dashboard").text  # the sign-in form again


def test_a_revoked_key_ends_its_sessions_and_a_tampered_cookie_is_refused(
    client: TestClient, world: World, database_url: str
) -> None:
    sign_in(client, world.acme_key)
    cookie = client.cookies.get(SESSION_COOKIE)
    assert cookie is not None
    assert client.get("/dashboard/api/overview").status_code == 200
    use_cookie(client, cookie[:-2] + "xx")
    assert client.get("/dashboard/api/overview").status_code == 401
    use_cookie(client, cookie)
    assert client.get("/dashboard/api/overview").status_code == 200

    async def revoke() -> None:
        connection = await asyncpg.connect(database_url)
        try:
            await revoke_key(connection, world.acme_key_id)
        finally:
            await connection.close()

    asyncio.run(revoke())
    assert _status_within(client, "/dashboard/api/overview", 401, seconds=3.0)


def _status_within(client: TestClient, path: str, status: int, seconds: float) -> bool:
    """Whether ``path`` answers ``status`` within ``seconds`` (a process reuses a session
    lookup for a second)."""
    deadline = datetime.now(UTC) + timedelta(seconds=seconds)
    while datetime.now(UTC) < deadline:
        if client.get(path).status_code == status:
            return True
    return False


def test_a_session_expires(database_url: str, world: World, tmp_path: Path) -> None:
    with _client(database_url, tmp_path, session_hours=1 / 3600) as client:  # one second
        sign_in(client, world.acme_key)
        assert client.get("/dashboard/api/overview").status_code == 200
        assert _status_within(client, "/dashboard/api/overview", 401, seconds=10.0)


def test_without_an_admin_token_there_is_no_operator_sign_in(
    database_url: str, world: World, tmp_path: Path
) -> None:
    with _client(database_url, tmp_path, admin_token=None) as client:
        form = client.get("/dashboard").text
        assert "needs <code>BILLING_ADMIN_TOKEN</code>" in form
        assert sign_in(client, "").status_code == 401
        assert sign_in(client, "anything").status_code == 401
        assert sign_in(client, world.acme_key).status_code == 303  # tenants still can


def test_sessions_are_shared_by_gateway_processes_with_one_secret(
    database_url: str, world: World, tmp_path: Path
) -> None:
    secret = "one-secret-for-every-worker"
    with (
        _client(database_url, tmp_path / "1", session_secret=secret) as first,
        _client(database_url, tmp_path / "2", session_secret=secret) as second,
        _client(database_url, tmp_path / "3") as other,
    ):
        sign_in(first, world.acme_key)
        cookie = first.cookies.get(SESSION_COOKIE)
        assert cookie is not None
        use_cookie(second, cookie)
        assert second.get("/dashboard/api/overview").status_code == 200
        use_cookie(other, cookie)
        assert other.get("/dashboard/api/overview").status_code == 401  # another secret


def test_the_page_and_its_assets_are_served_from_the_package(client: TestClient) -> None:
    for path, kind in (
        ("/dashboard/static/dashboard.js", "javascript"),
        ("/dashboard/static/dashboard.css", "css"),
        ("/dashboard/static/vendor/uplot/uPlot.iife.min.js", "javascript"),
    ):
        response = client.get(path)
        assert response.status_code == 200 and kind in response.headers["content-type"], path
    page = client.get("/dashboard").text
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere


def test_an_operator_session_ends_when_the_admin_token_changes(
    database_url: str, world: World, tmp_path: Path
) -> None:
    secret = "one-secret-for-every-worker"
    with (
        _client(database_url, tmp_path / "1", session_secret=secret) as before,
        _client(
            database_url, tmp_path / "2", session_secret=secret, admin_token="a-new-admin-token"
        ) as after,
    ):
        assert sign_in(before, TOKEN).status_code == 303
        cookie = before.cookies.get(SESSION_COOKIE)
        assert cookie is not None
        assert before.get("/dashboard/api/operator/tenants").status_code == 200
        use_cookie(after, cookie)  # the same cookie, on a gateway whose token was rotated
        assert after.get("/dashboard/api/operator/tenants").status_code == 401


def test_behind_a_tls_proxy_forms_are_checked_against_the_public_url(
    database_url: str, world: World, tmp_path: Path
) -> None:
    public = "https://billing.example.com"
    with _client(database_url, tmp_path, public_url=public) as client:
        page = client.get("/dashboard")
        assert "secure" in page.headers["set-cookie"].lower()  # the form's CSRF cookie
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        form = {"csrf": token.group(1), "credential": world.acme_key}
        own_host = client.post(
            "/dashboard/sign-in",
            data=form,
            headers={"origin": "http://testserver"},  # what the proxy forwarded to
            follow_redirects=False,
        )
        assert own_host.status_code == 403
        client.cookies.set(CSRF_COOKIE, page.cookies[CSRF_COOKIE], path="/dashboard")
        signed = client.post(
            "/dashboard/sign-in", data=form, headers={"origin": public}, follow_redirects=False
        )
        assert signed.status_code == 303
        assert "secure" in signed.headers["set-cookie"].lower()
