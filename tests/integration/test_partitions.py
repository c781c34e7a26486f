"""Monthly partitions of billing_transactions (migration 005) through the projector's
transaction: rows land in their month's partition, one row per request across months,
re-rating across partitions, and retention that retires only what is older than the
setting and freezes it."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from services.adapters.database import init_connection
from services.adapters.partitions import (
    months_ahead,
    partition_months,
    retention_cutoff,
    retire,
    retired_before,
    retired_months,
)
from services.core.events import UsagePriced, UsageRecorded
from services.core.pricebook import InMemoryPriceBook
from services.core.rating import rate
from services.projector.apply import apply_batch
from tests.integration.pipeline import BILLING
from tests.integration.test_projector_apply import fold, recorded
from tests.integration.test_rebuild import scaled

pytestmark = pytest.mark.integration

PRICED_AT = datetime(2027, 2, 1, tzinfo=UTC)
SINCE_2000 = datetime(2000, 1, 1, tzinfo=UTC)
BOUNDARIES = {
    datetime(2026, 10, 31, 23, 59, 59, 999999, tzinfo=UTC): "billing_transactions_y2026m10",
    datetime(2026, 11, 1, 0, 0, tzinfo=UTC): "billing_transactions_y2026m11",
    # 00:30 on Nov 1st in UTC+1 is still October in UTC: months are UTC months.
    datetime(2026, 11, 1, 0, 30, tzinfo=UTC) - timedelta(hours=1): "billing_transactions_y2026m10",
    datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC): "billing_transactions_y2026m12",
    datetime(2027, 1, 1, 0, 0, tzinfo=UTC): "billing_transactions_y2027m01",
    datetime(2003, 5, 15, 8, 0, tzinfo=UTC): "billing_transactions_y2003m05",  # a late one
}


def fact_at(n: int, occurred_at: datetime) -> UsageRecorded:
    """Request ``n`` (tenant n % 3, model n % 3) occurring at ``occurred_at``."""
    return recorded(n, random.Random(n)).model_copy(
        update={"occurred_at": occurred_at, "recorded_at": occurred_at + timedelta(seconds=1)}
    )


def priced_at(n: int, occurred_at: datetime, book: InMemoryPriceBook) -> UsagePriced:
    """Revision 1 of request ``n`` at ``occurred_at`` (prices in effect since 2000)."""
    return rate(fact_at(n, occurred_at), scaled(book, Decimal(1), SINCE_2000), priced_at=PRICED_AT)


def revised(
    event: UsagePriced, book: InMemoryPriceBook, revision: int, occurred_at: datetime | None = None
) -> UsagePriced:
    """The next revision of ``event`` under ``book`` (optionally claiming another time)."""
    n = int(event.request_id.removeprefix("req-"))
    fact = fact_at(n, occurred_at or event.occurred_at)
    return rate(fact, book, priced_at=PRICED_AT, revision=revision, previous_total=event.total_cost)


async def connect(url: str) -> asyncpg.Connection:
    connection = await asyncpg.connect(url)
    await init_connection(connection)
    return connection


async def placement(connection: asyncpg.Connection) -> dict[str, str]:
    """request_id → the partition its row is in."""
    rows = await connection.fetch(
        "SELECT request_id, tableoid::regclass::text AS part FROM billing_transactions"
    )
    return {r["request_id"]: r["part"] for r in rows}


async def test_month_boundaries_land_in_their_partitions(
    database_url: str, snapshot_book: InMemoryPriceBook
) -> None:
    events = [priced_at(n, t, snapshot_book) for n, t in enumerate(BOUNDARIES)]
    connection = await connect(database_url)
    try:
        result = await apply_batch(connection, "projector", events, {})
        assert result.inserted == len(events)
        where = await placement(connection)
        assert where == {
            e.request_id: part for e, part in zip(events, BOUNDARIES.values(), strict=True)
        }
        months = await partition_months(connection)
        assert date(2003, 5, 1) in months  # created on demand, nothing between made
        assert date(2003, 6, 1) not in months
        assert set(months_ahead(datetime.now(UTC))) <= months  # the migration made these
        # A month's page reads one partition (pruned at plan time).
        plan = await connection.fetchval(
            "EXPLAIN (FORMAT JSON) SELECT * FROM billing_transactions WHERE tenant_id = $1"
            " AND occurred_at >= '2026-11-01Z' AND occurred_at < '2026-12-01Z'"
            " ORDER BY occurred_at DESC, request_id DESC LIMIT 100",
            "tenant-0",
        )
        relations = _relations(json.loads(plan))  # the json type has no codec: text
        scanned = {n for n in relations if n.startswith("billing_transactions_y")}
        assert scanned == {"billing_transactions_y2026m11"}
        await fold(connection)
    finally:
        await connection.close()


def _relations(node: object) -> set[str]:
    """Every "Relation Name" in an EXPLAIN (FORMAT JSON) plan."""
    found: set[str] = set()
    if isinstance(node, dict):
        if "Relation Name" in node:
            found.add(node["Relation Name"])
        for value in node.values():
            found |= _relations(value)
    elif isinstance(node, list):
        for value in node:
            found |= _relations(value)
    return found


async def test_one_row_per_request_across_months(
    database_url: str, snapshot_book: InMemoryPriceBook
) -> None:
    """The database keys rows by (request_id, occurred_at); the same request_id again with
    another occurred_at (a client re-sending usage without one gets "now") is a duplicate,
    in whichever month it claims, in the same batch or a later one."""
    first = priced_at(1, datetime(2026, 11, 30, 23, 0, tzinfo=UTC), snapshot_book)
    later = priced_at(1, datetime(2026, 12, 1, 1, 0, tzinfo=UTC), snapshot_book)
    connection = await connect(database_url)
    try:
        await apply_batch(connection, "projector", [first], {})
        result = await apply_batch(connection, "projector", [later, first], {})
        assert (result.inserted, result.duplicates) == (0, 2)
        assert await placement(connection) == {first.request_id: "billing_transactions_y2026m11"}
        assert (await fold(connection))[first.tenant_id] == first.total_cost
    finally:
        await connection.close()


async def test_re_rating_across_two_partitions(
    database_url: str, snapshot_book: InMemoryPriceBook
) -> None:
    """Revisions of requests in November and December: each row replaced in its own
    partition, one adjustment each, the summary moved by exactly the differences; a revision
    that moves a request to another month leaves one row, in the new month."""
    times = [datetime(2026, 11, 20, tzinfo=UTC), datetime(2026, 12, 5, tzinfo=UTC)]
    ones = [priced_at(n, times[n % 2], snapshot_book) for n in range(10)]
    cheaper = scaled(snapshot_book, Decimal("0.5"), SINCE_2000)
    twos = [revised(e, cheaper, 2) for e in ones]
    moved = revised(twos[0], cheaper, 3, datetime(2027, 1, 2, tzinfo=UTC))
    connection = await connect(database_url)
    try:
        await apply_batch(connection, "projector", ones, {})
        before = await fold(connection)
        result = await apply_batch(connection, "projector", twos, {})
        assert (result.inserted, result.revised) == (0, 10)
        where = await placement(connection)
        assert (
            sorted(where.values())
            == ["billing_transactions_y2026m11"] * 5 + ["billing_transactions_y2026m12"] * 5
        )
        after = await fold(connection)
        for tenant in before:
            change = sum(
                (
                    t.total_cost - o.total_cost
                    for o, t in zip(ones, twos, strict=True)
                    if o.tenant_id == tenant
                ),
                Decimal(0),
            )
            assert after[tenant] == before[tenant] + change
        deltas = await connection.fetch(
            "SELECT request_id, delta_cost FROM billing_adjustments WHERE new_revision = 2"
        )
        assert {r["request_id"]: r["delta_cost"] for r in deltas} == {
            t.request_id: t.total_cost - o.total_cost for o, t in zip(ones, twos, strict=True)
        }

        result = await apply_batch(connection, "projector", [moved], {})
        assert result.revised == 1
        where = await placement(connection)
        assert where[moved.request_id] == "billing_transactions_y2027m01"
        assert len(where) == 10
        totals = await fold(connection)
        tenant = moved.tenant_id
        assert totals[tenant] == after[tenant] - twos[0].total_cost + moved.total_cost
    finally:
        await connection.close()


@pytest.mark.parametrize("action", ["detach", "drop"])
async def test_retention_retires_only_older_months_and_freezes_them(
    database_url: str, snapshot_book: InMemoryPriceBook, action: str
) -> None:
    now = datetime(2027, 3, 10, tzinfo=UTC)
    cutoff = retention_cutoff(now, 12)
    assert cutoff == date(2026, 3, 1)  # March 2026 .. March 2027 kept
    months = [
        datetime(2026, 1, 31, 23, 0, tzinfo=UTC),
        datetime(2026, 2, 28, 23, 59, tzinfo=UTC),  # the last instant retired
        datetime(2026, 3, 1, 0, 0, tzinfo=UTC),  # the first instant kept
        datetime(2027, 3, 1, tzinfo=UTC),
    ]
    events = [priced_at(n, months[n % 4], snapshot_book) for n in range(40)]
    connection = await connect(database_url)
    try:
        await apply_batch(connection, "projector", events, {})
        summary_before = await summary(connection)
        retired = await retire(connection, cutoff, action)  # type: ignore[arg-type]
        assert [r.month for r in retired] == [date(2026, 1, 1), date(2026, 2, 1)]
        for r in retired:
            in_month = [
                e
                for e in events
                if e.occurred_at.month == r.month.month and e.occurred_at.year == r.month.year
            ]
            assert r.transactions == len(in_month)
            assert r.total_cost == sum((e.total_cost for e in in_month), Decimal(0))
            assert r.action == action
        assert await retired_before(connection) == datetime(2026, 3, 1, tzinfo=UTC)
        remaining = await placement(connection)
        assert len(remaining) == 20
        assert set(remaining.values()) == {
            "billing_transactions_y2026m03",
            "billing_transactions_y2027m03",
        }
        assert await summary(connection) == summary_before  # the totals are kept
        kept_tables = {
            r["relname"]
            for r in await connection.fetch(
                "SELECT relname FROM pg_class WHERE relname = ANY($1::text[])",
                ["billing_transactions_y2026m01", "billing_transactions_y2026m02"],
            )
        }
        assert kept_tables == ({r.partition for r in retired} if action == "detach" else set())
        assert await retire(connection, cutoff, action) == []  # nothing more to retire

        # Events for a retired month are counted and not applied; others still are.
        late = priced_at(100, datetime(2026, 2, 10, tzinfo=UTC), snapshot_book)
        revision = revised(events[0], scaled(snapshot_book, Decimal(2), SINCE_2000), 2)
        fresh = priced_at(101, datetime(2026, 3, 2, tzinfo=UTC), snapshot_book)
        result = await apply_batch(connection, "projector", [late, revision, fresh], {})
        assert (result.retired, result.inserted) == (2, 1)
        assert await partition_months(connection) >= {date(2026, 3, 1)}
        assert date(2026, 2, 1) not in await partition_months(connection)
        after = await summary(connection)
        changed = {k for k in after if after[k] != summary_before.get(k)}
        assert changed == {(fresh.tenant_id, date(2026, 3, 2))}
        assert [m.month for m in await retired_months(connection)] == [
            date(2026, 1, 1),
            date(2026, 2, 1),
        ]
    finally:
        await connection.close()


async def summary(connection: asyncpg.Connection) -> dict[tuple[str, date], tuple[int, Decimal]]:
    rows = await connection.fetch(
        "SELECT tenant_id, day, sum(requests)::bigint AS r, sum(total_cost) AS t"
        " FROM tenant_billing_summary GROUP BY tenant_id, day"
    )
    return {(r["tenant_id"], r["day"]): (r["r"], r["t"]) for r in rows}


def test_the_cli_lists_partitions_and_retired_months(
    database_url: str, snapshot_book: InMemoryPriceBook
) -> None:
    async def setup() -> None:
        connection = await connect(database_url)
        try:
            old = priced_at(1, datetime(2025, 6, 3, tzinfo=UTC), snapshot_book)
            await apply_batch(connection, "projector", [old], {})
            await retire(connection, date(2025, 7, 1), "drop")
        finally:
            await connection.close()

    asyncio.run(setup())
    done = subprocess.run(
        [BILLING, "partitions", "--json"],
        env={**os.environ, "BILLING_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    listed = json.loads(done.stdout)
    names = [p["partition"] for p in listed["partitions"]]
    assert "billing_transactions_y2025m06" not in names
    assert len(names) == 3  # this month and the next two, from the migration
    assert listed["retired"][0]["month"] == "2025-06"
    assert listed["retired"][0]["transactions"] == 1
    assert listed["retired"][0]["action"] == "drop"
