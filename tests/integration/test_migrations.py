"""Migrations: applied in order, once, by the library and by `billing migrate`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from services.adapters.database import init_connection, migrate, migrations
from services.adapters.errors import DatabaseError
from services.adapters.partitions import partition_name
from services.adapters.readmodels import TRANSACTION_COLUMNS, transaction_row
from services.core.periods import month_of
from services.core.pricebook import InMemoryPriceBook
from services.core.rating import rate
from services.projector.apply import apply_batch
from tests.integration.test_partitions import fact_at, priced_at

pytestmark = pytest.mark.integration

BILLING = shutil.which("billing", path=os.path.dirname(sys.executable)) or "billing"


async def test_migrate_applies_every_file_once(empty_database_url: str) -> None:
    first = await migrate(empty_database_url)
    assert first == [m.name for m in migrations()]
    assert await migrate(empty_database_url) == []
    connection = await asyncpg.connect(empty_database_url)
    try:
        tables = {
            r["tablename"]
            for r in await connection.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        }
    finally:
        await connection.close()
    expected = {"billing_transactions", "tenant_billing_summary", "billing_adjustments"}
    assert expected | {"consumer_offsets", "price_versions", "schema_migrations"} <= tables


def test_the_cli_migrates_the_configured_database(empty_database_url: str) -> None:
    env = {**os.environ, "BILLING_DATABASE_URL": empty_database_url}
    run = lambda: subprocess.run(  # noqa: E731
        [BILLING, "migrate"], env=env, capture_output=True, text=True, timeout=60
    )
    first, second = run(), run()
    assert first.returncode == 0, first.stderr
    assert "applied 001_billing" in first.stdout
    assert second.stdout.strip() == "database is up to date"


def test_a_gap_in_numbering_is_refused(tmp_path: Path) -> None:
    (tmp_path / "001_a.sql").write_text("SELECT 1;")
    (tmp_path / "003_c.sql").write_text("SELECT 1;")
    with pytest.raises(DatabaseError, match="002 is missing"):
        migrations(tmp_path)


async def test_partitioning_keeps_every_existing_row(
    empty_database_url: str, tmp_path: Path, snapshot_book: InMemoryPriceBook
) -> None:
    """Rows projected before migration 005 are all there after it, each in its month's
    partition, with their adjustments; the projector then revises them in place."""
    for migration in migrations()[:4]:
        (tmp_path / f"{migration.name}.sql").write_text(migration.sql)
    await migrate(empty_database_url, tmp_path)
    events = [
        priced_at(
            n, datetime(2026, 9 + n % 3, 28, tzinfo=UTC) + timedelta(days=n % 5), snapshot_book
        )
        for n in range(30)
    ]
    connection = await asyncpg.connect(empty_database_url)
    await init_connection(connection)
    try:
        await connection.copy_records_to_table(
            "billing_transactions",
            records=[transaction_row(e) for e in events],
            columns=TRANSACTION_COLUMNS,
        )
        await connection.execute(
            "INSERT INTO billing_adjustments (request_id, tenant_id, old_revision, new_revision,"
            " old_total_cost, new_total_cost, delta_cost, price_version, reason)"
            " VALUES ('req-0', 'tenant-0', 1, 2, 1, 1, 0, 1, 'before 005')"
        )
        before = {
            r["request_id"]: dict(r)
            for r in await connection.fetch("SELECT * FROM billing_transactions")
        }
        assert (await migrate(empty_database_url))[0] == "005_partitioned_transactions"
        after = {
            r["request_id"]: dict(r)
            for r in await connection.fetch("SELECT * FROM billing_transactions")
        }
        assert after == before
        where = await connection.fetch(
            "SELECT request_id, occurred_at, tableoid::regclass::text AS part"
            " FROM billing_transactions"
        )
        assert {r["part"] for r in where} >= {
            "billing_transactions_y2026m09",
            "billing_transactions_y2026m10",
            "billing_transactions_y2026m11",
            "billing_transactions_y2026m12",
        }
        for r in where:
            assert r["part"] == partition_name("billing_transactions", month_of(r["occurred_at"]))
        assert await connection.fetchval("SELECT reason FROM billing_adjustments") == "before 005"
        again = rate(
            fact_at(3, events[3].occurred_at),
            snapshot_book,
            priced_at=events[3].priced_at,
            revision=2,
            previous_total=events[3].total_cost,
        )
        result = await apply_batch(connection, "projector", [again, events[4]], {})
        assert (result.inserted, result.revised, result.duplicates) == (0, 1, 1)
        assert await connection.fetchval("SELECT count(*) FROM billing_transactions") == 30
    finally:
        await connection.close()
