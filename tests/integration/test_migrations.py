"""Migrations: applied in order, once, by the library and by `billing migrate`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from services.adapters.database import migrate, migrations
from services.adapters.errors import DatabaseError

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
