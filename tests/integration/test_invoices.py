"""Period close and invoices (issue #12): exact, gapless, immutable, late data as adjustments.

Usage across two months is applied with the projector's own batch function; invoices are
closed with ``close_month`` (the job behind ``billing invoices close``) and read back.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from click.testing import CliRunner, Result

from services.adapters.credits import add_grant
from services.adapters.database import init_connection
from services.adapters.invoices import invoice_document
from services.adapters.kafka import ensure_topics
from services.adapters.tenants import create_tenant
from services.adapters.topics import Topics
from services.cli.main import main
from services.core.credits import grant_of
from services.core.events import InvoiceIssued, UsagePriced
from services.core.pricebook import InMemoryPriceBook
from services.core.rating import rate
from services.jobs.invoicing import CloseError, close_month, publish_issued
from services.projector.apply import apply_batch
from tests.integration.test_ingest import read_all
from tests.integration.test_projector_apply import recorded

pytestmark = pytest.mark.integration

NOV, DEC = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
AFTER_NOV = datetime(2026, 12, 5, tzinfo=UTC)
D = Decimal


@pytest.fixture
async def connection(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    await init_connection(connection)
    try:
        yield connection
    finally:
        await connection.close()


def events(book: InMemoryPriceBook, first: int, count: int, start: datetime) -> list[UsagePriced]:
    rng = random.Random(first)
    out = []
    for n in range(first, first + count):
        fact = recorded(n, rng)
        fact = fact.model_copy(
            update={"occurred_at": start + timedelta(hours=n % 300), "tenant_id": f"t{n % 2}"}
        )
        out.append(rate(fact, book, priced_at=start))
    return out


async def month_total(connection: asyncpg.Connection, tenant: str, month: datetime) -> Decimal:
    return Decimal(
        await connection.fetchval(
            "SELECT coalesce(sum(total_cost), 0) FROM tenant_billing_summary WHERE tenant_id = $1"
            " AND day >= $2 AND day < $3",
            tenant,
            month.date(),
            (month + timedelta(days=32)).replace(day=1).date(),
        )
    )


async def test_close_issues_exact_gapless_invoices_once(
    connection: asyncpg.Connection, snapshot_book: InMemoryPriceBook
) -> None:
    for tenant in ("t0", "t1"):
        await create_tenant(connection, tenant)
    await apply_batch(connection, "projector", events(snapshot_book, 0, 120, NOV), {})
    await apply_batch(connection, "projector", events(snapshot_book, 500, 40, DEC), {})

    with pytest.raises(CloseError, match="not over yet"):
        await close_month(connection, DEC.date(), now=AFTER_NOV)
    report = await close_month(connection, NOV.date(), now=AFTER_NOV)
    assert report.issued == ["INV-2026-11-000001", "INV-2026-11-000002"]
    for number, tenant in zip(report.issued, ("t0", "t1"), strict=True):
        document = json.loads(await invoice_document(connection, number) or "", parse_float=D)
        assert document["tenant_id"] == tenant and document["period"] == "2026-11"
        usage = [line for line in document["lines"] if line["kind"] == "usage"]
        assert usage and all(line["period"] == "2026-11" for line in usage)
        assert D(document["subtotal"]) == await month_total(connection, tenant, NOV)  # exactly
        assert sum(D(line["amount"]) for line in document["lines"]) == D(document["amount_due"])
        assert D(document["amount_due"]) == D(document["subtotal"]).quantize(D("0.01"))
        assert document["amount_due"].split(".")[1].__len__() == 2

    again = await close_month(connection, NOV.date(), now=AFTER_NOV)
    assert again.issued == []  # nothing new, no number taken
    december = await close_month(connection, DEC.date(), now=datetime(2027, 1, 2, tzinfo=UTC))
    assert december.issued == ["INV-2026-12-000003", "INV-2026-12-000004"]  # gapless


async def test_late_usage_and_re_rating_land_on_the_next_invoice_as_adjustments(
    connection: asyncpg.Connection, snapshot_book: InMemoryPriceBook
) -> None:
    for tenant in ("t0", "t1"):
        await create_tenant(connection, tenant)
    november = events(snapshot_book, 0, 60, NOV)
    await apply_batch(connection, "projector", november, {})
    await apply_batch(connection, "projector", events(snapshot_book, 500, 20, DEC), {})
    (first, _) = (await close_month(connection, NOV.date(), now=AFTER_NOV)).issued
    issued = await invoice_document(connection, first)

    # A late November request, and a re-rating of a November request (revision 2).
    late = events(snapshot_book, 900, 2, NOV)
    old = next(e for e in november if e.tenant_id == "t0")
    corrected = replace_cost(old, old.total_cost / 2)
    await apply_batch(connection, "projector", [*late, corrected], {})
    with pytest.raises(asyncpg.RaiseError, match="never changed"):
        await connection.execute("UPDATE billing_invoices SET amount_due = 0")
    assert await invoice_document(connection, first) == issued  # byte for byte

    report = await close_month(connection, DEC.date(), now=datetime(2027, 1, 2, tzinfo=UTC))
    documents = {}
    for number in report.issued:
        document = json.loads(await invoice_document(connection, number) or "", parse_float=D)
        documents[document["tenant_id"]] = document
    for tenant, document in documents.items():
        changes = [line for line in document["lines"] if line["kind"] == "adjustment"]
        assert changes and all(line["period"] == "2026-11" for line in changes), tenant
    # Conservation: every invoice's subtotal together = every transaction's current total.
    invoiced = await connection.fetchval("SELECT sum(subtotal) FROM billing_invoices")
    current = await connection.fetchval("SELECT sum(total_cost) FROM billing_transactions")
    assert Decimal(invoiced) == Decimal(current)


def replace_cost(event: UsagePriced, total: Decimal) -> UsagePriced:
    """``event`` re-rated to ``total`` (revision + 1, its delta)."""
    breakdown = event.breakdown.model_copy(update={"total_cost": total})
    return event.model_copy(
        update={
            "revision": event.revision + 1,
            "total_cost": total,
            "previous_total_cost": event.total_cost,
            "delta_cost": total - event.total_cost,
            "breakdown": breakdown,
            "reason": "test correction",
        }
    )


async def test_credits_are_applied_and_unpriced_usage_blocks_the_close(
    connection: asyncpg.Connection, snapshot_book: InMemoryPriceBook, database_url: str
) -> None:
    for tenant in ("t0", "t1"):
        await create_tenant(connection, tenant)
    await add_grant(connection, grant_of("t0", "5", "prepaid", now=datetime.now(UTC)))
    await apply_batch(connection, "projector", events(snapshot_book, 0, 40, NOV), {})
    await connection.execute(
        "INSERT INTO unpriced_usage (request_id, tenant_id, provider_model_id, event, reason)"
        " VALUES ('u1', 't1', 'acme/new-model', $1, 'no price')",
        {"occurred_at": "2026-11-03T00:00:00Z"},
    )
    with pytest.raises(CloseError, match="acme/new-model"):
        await close_month(connection, NOV.date(), now=AFTER_NOV)
    assert await connection.fetchval("SELECT count(*) FROM billing_invoices") == 0

    runner = CliRunner()

    async def billing(*args: str) -> Result:  # the CLI runs its own event loop: a thread
        env = {"BILLING_DATABASE_URL": database_url}
        return await asyncio.to_thread(runner.invoke, main, list(args), env=env)

    refused = await billing("invoices", "close", "--month", "2026-11")
    assert refused.exit_code == 1 and "acme/new-model" in refused.output
    closed = await billing("invoices", "close", "--month", "2026-11", "--allow-unpriced")
    assert closed.exit_code == 0, closed.output
    listed = json.loads((await billing("invoices", "list", "--json")).output)
    t0 = next(i for i in listed if i["tenant_id"] == "t0")
    subtotal = D(t0["subtotal"])
    assert D(t0["credits_applied"]) == min(subtotal, D(5))
    assert D(t0["amount_due"]) == (subtotal - min(subtotal, D(5))).quantize(D("0.01"))
    shown = await billing("invoices", "show", t0["number"])
    assert json.loads(shown.output)["number"] == t0["number"]


async def test_invoice_issued_is_published_once(
    connection: asyncpg.Connection,
    snapshot_book: InMemoryPriceBook,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    for tenant in ("t0", "t1"):
        await create_tenant(connection, tenant)
    await apply_batch(connection, "projector", events(snapshot_book, 0, 20, NOV), {})
    issued = (await close_month(connection, NOV.date(), now=AFTER_NOV)).issued
    topics = Topics.named(topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.partitions())
    assert await publish_issued(connection, kafka_bootstrap, topics.invoices) == 2
    assert await publish_issued(connection, kafka_bootstrap, topics.invoices) == 0  # once
    values = await read_all(kafka_bootstrap, topics.invoices, 2)
    published = [InvoiceIssued.model_validate_json(v) for v in values]
    assert sorted(e.number for e in published) == sorted(issued)
    for event in published:
        row = await connection.fetchrow(
            "SELECT subtotal, amount_due FROM billing_invoices WHERE number = $1", event.number
        )
        assert (event.subtotal, event.amount_due) == (row["subtotal"], row["amount_due"])


async def test_reconcile_compares_the_provider_bill_with_the_issued_invoices(
    connection: asyncpg.Connection,
    snapshot_book: InMemoryPriceBook,
    database_url: str,
    tmp_path: Path,
) -> None:
    for tenant in ("t0", "t1"):
        await create_tenant(connection, tenant)
    await apply_batch(connection, "projector", events(snapshot_book, 0, 40, NOV), {})
    await close_month(connection, NOV.date(), now=AFTER_NOV)
    late = events(snapshot_book, 900, 3, NOV)  # after the close: an adjustment on December's
    await apply_batch(connection, "projector", late, {})
    await apply_batch(connection, "projector", events(snapshot_book, 700, 5, DEC), {})
    await close_month(connection, DEC.date(), now=datetime(2027, 1, 2, tzinfo=UTC))
    rows = await connection.fetch(
        "SELECT model, sum(total_cost) AS total FROM billing_transactions"
        " WHERE occurred_at < $1 GROUP BY model",
        DEC,
    )
    exact = tmp_path / "provider.csv"
    exact.write_text("model,cost\n" + "".join(f"{r['model']},{r['total']}\n" for r in rows))
    off = tmp_path / "off.csv"
    off.write_text("model,cost\n" + "".join(f"{r['model']},{r['total'] * 2}\n" for r in rows))

    runner = CliRunner()

    async def reconcile(path: Path) -> Result:
        args = ["reconcile", "--month", "2026-11", "--invoice", str(path)]
        env = {"BILLING_DATABASE_URL": database_url}
        return await asyncio.to_thread(runner.invoke, main, args, env=env)

    matched = await reconcile(exact)  # invoices + the adjustment December's made to November
    assert matched.exit_code == 0, matched.output
    assert "ours: issued invoices and their adjustments" in matched.output
    assert (await reconcile(off)).exit_code == 1


async def test_months_never_closed_are_swept_in_and_closing_them_later_adds_nothing(
    connection: asyncpg.Connection, snapshot_book: InMemoryPriceBook
) -> None:
    """Nothing is left out: October was never closed (the stack was down), so November's
    invoice carries October's usage as adjustments naming it; closing October afterwards
    issues nothing more. A late October event then lands on December's invoice."""
    for tenant in ("t0", "t1"):
        await create_tenant(connection, tenant)
    october = datetime(2026, 10, 1, tzinfo=UTC)
    await apply_batch(connection, "projector", events(snapshot_book, 0, 20, october), {})
    await apply_batch(connection, "projector", events(snapshot_book, 100, 20, NOV), {})
    await close_month(connection, NOV.date(), now=AFTER_NOV)
    for number in await connection.fetch("SELECT number FROM billing_invoices"):
        document = json.loads(await invoice_document(connection, number[0]) or "")
        assert {line.get("period") for line in document["lines"]} >= {"2026-10", "2026-11"}
    assert (await close_month(connection, october.date(), now=AFTER_NOV)).issued == []
    await apply_batch(connection, "projector", events(snapshot_book, 900, 2, october), {})
    await close_month(connection, DEC.date(), now=datetime(2027, 1, 2, tzinfo=UTC))
    invoiced = await connection.fetchval("SELECT sum(subtotal) FROM billing_invoices")
    current = await connection.fetchval("SELECT sum(total_cost) FROM billing_transactions")
    assert Decimal(invoiced) == Decimal(current)  # conservation, exactly
