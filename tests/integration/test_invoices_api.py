"""Invoices over HTTP (issue #12): a tenant's own only (another's is 404, not 403), the JSON
document byte for byte, HTML and PDF by suffix or Accept; the admin list by tenant and month."""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from fastapi.testclient import TestClient

from services.adapters.database import init_connection
from services.adapters.invoices import invoice_document
from services.adapters.settings import Settings
from services.adapters.tenants import create_key, create_tenant
from services.core.pricebook import InMemoryPriceBook
from services.core.rating import rate
from services.gateway.app import create_app
from services.jobs.invoicing import close_month
from services.projector.apply import apply_batch
from tests.integration.test_projector_apply import recorded

pytestmark = pytest.mark.integration

TOKEN = "invoices-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
NOV = datetime(2026, 11, 1, tzinfo=UTC)


async def _issue(database_url: str, book: InMemoryPriceBook) -> dict[str, tuple[str, str]]:
    """Two tenants' November invoices; tenant → (its key, its invoice number)."""
    connection = await asyncpg.connect(database_url)
    await init_connection(connection)
    try:
        keys = {}
        for tenant in ("acme", "globex"):
            await create_tenant(connection, tenant)
            keys[tenant] = (await create_key(connection, tenant, "ci"))[1]
        rng = random.Random(3)
        events = []
        for n in range(30):
            fact = recorded(n, rng).model_copy(
                update={
                    "tenant_id": ("acme", "globex")[n % 2],
                    "occurred_at": NOV + timedelta(hours=n),
                }
            )
            events.append(rate(fact, book, priced_at=NOV))
        await apply_batch(connection, "projector", events, {})
        report = await close_month(connection, NOV.date(), now=datetime(2026, 12, 4, tzinfo=UTC))
        numbers = {}
        for number in report.issued:
            tenant = (
                "acme"
                if '"tenant_id": "acme"' in (await invoice_document(connection, number) or "")
                else "globex"
            )
            numbers[tenant] = (keys[tenant], number)
        return numbers
    finally:
        await connection.close()


@pytest.fixture
def issued(database_url: str, snapshot_book: InMemoryPriceBook) -> dict[str, tuple[str, str]]:
    return asyncio.run(_issue(database_url, snapshot_book))


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path, catalogue_sync=False, database_url=database_url, admin_token=TOKEN
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_tenant_lists_and_reads_its_own_invoices_only(
    client: TestClient, issued: dict[str, tuple[str, str]], database_url: str
) -> None:
    key, number = issued["acme"]
    _, theirs = issued["globex"]
    listed = client.get("/v1/billing/invoices", headers=bearer(key))
    assert listed.status_code == 200
    assert [i["number"] for i in listed.json()["invoices"]] == [number]

    own = client.get(f"/v1/billing/invoices/{number}", headers=bearer(key))
    assert own.status_code == 200 and own.headers["content-type"] == "application/json"

    async def stored() -> str:
        connection = await asyncpg.connect(database_url)
        try:
            return await invoice_document(connection, number) or ""
        finally:
            await connection.close()

    assert own.text == asyncio.run(stored())  # the issued document, byte for byte
    for path in (theirs, f"{theirs}.pdf", f"{theirs}.html", "INV-2026-11-999999"):
        other = client.get(f"/v1/billing/invoices/{path}", headers=bearer(key))
        assert other.status_code == 404, path  # not 403: nothing is revealed
        assert theirs not in other.text or path == theirs or "no invoice" in other.text
    assert client.get(f"/v1/billing/invoices/{number}").status_code == 401


def test_html_and_pdf_by_suffix_or_accept(
    client: TestClient, issued: dict[str, tuple[str, str]]
) -> None:
    key, number = issued["acme"]
    document = client.get(f"/v1/billing/invoices/{number}.json", headers=bearer(key)).json()
    html = client.get(f"/v1/billing/invoices/{number}.html", headers=bearer(key))
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert number in html.text and document["amount_due"] in html.text
    accepted = client.get(
        f"/v1/billing/invoices/{number}", headers=bearer(key) | {"Accept": "text/html"}
    )
    assert accepted.text == html.text
    pdf = client.get(
        f"/v1/billing/invoices/{number}", headers=bearer(key) | {"Accept": "application/pdf"}
    )
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
    pypdf = pytest.importorskip("pypdf", reason="pypdf (test extra) reads the PDF's text")
    text = "".join(page.extract_text() for page in pypdf.PdfReader(io.BytesIO(pdf.content)).pages)
    assert number in text and document["amount_due"] in text


def test_the_admin_lists_every_tenants_invoices_by_month(
    client: TestClient, issued: dict[str, tuple[str, str]]
) -> None:
    everyone = client.get("/internal/billing/invoices", headers=ADMIN)
    assert sorted(i["number"] for i in everyone.json()["invoices"]) == sorted(
        n for _, n in issued.values()
    )
    one = client.get("/internal/billing/invoices?tenant_id=globex&month=2026-11", headers=ADMIN)
    assert [i["number"] for i in one.json()["invoices"]] == [issued["globex"][1]]
    none = client.get("/internal/billing/invoices?month=2026-10", headers=ADMIN)
    assert none.json() == {"invoices": []}
    bad = client.get("/internal/billing/invoices?month=2026-13", headers=ADMIN)
    assert bad.status_code == 422 and bad.json()["field"] == "month"
    assert client.get("/internal/billing/invoices").status_code == 401
