"""Tenant API keys: created once, stored as hashes, revocable; a key sees its tenant only."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from fastapi.testclient import TestClient

from services.adapters.settings import Settings
from services.gateway.app import create_app
from tests.e2e.test_cli import BILLING
from tests.integration.test_query_api import seeded  # noqa: F401 - the shared fixture

pytestmark = pytest.mark.integration


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BILLING_DATABASE_URL": database_url}
    return subprocess.run([BILLING, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def client(seeded: str, tmp_path: Path) -> Iterator[TestClient]:  # noqa: F811
    settings = Settings(
        data_dir=tmp_path, catalogue_sync=False, database_url=seeded, admin_token="adm1n-s3cret"
    )
    app = create_app(settings)
    with TestClient(app) as test_client:
        app.state.resources.key_cache.ttl = 0.2  # revocation visible quickly in the test
        yield test_client


def test_keys_are_shown_once_scoped_to_their_tenant_and_revocable(
    client: TestClient,
    seeded: str,  # noqa: F811
) -> None:
    assert cli(seeded, "tenants", "create", "tenant-1").returncode == 0
    assert cli(seeded, "tenants", "create", "tenant-2").returncode == 0
    again = cli(seeded, "tenants", "create", "tenant-1")
    assert again.returncode == 1 and "already exists" in again.stderr
    made = cli(seeded, "keys", "create", "--tenant", "tenant-1", "--name", "ci")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("bk_")
    other = cli(seeded, "keys", "create", "--tenant", "tenant-2").stdout.strip()
    assert cli(seeded, "keys", "create", "--tenant", "nobody").returncode == 1

    listing = cli(seeded, "keys", "list").stdout
    assert "tenant-1" in listing and key not in listing  # never the secret
    stored = _stored_hashes(seeded)
    assert key.encode() not in b"".join(stored)

    mine = client.get("/v1/billing/summary", headers={"Authorization": f"Bearer {key}"})
    assert mine.status_code == 200 and mine.json()["tenant_id"] == "tenant-1"
    theirs = client.get("/v1/billing/transactions", headers={"Authorization": f"Bearer {other}"})
    assert {t["tenant_id"] for t in theirs.json()["transactions"]} == {"tenant-2"}
    # A tenant key cannot pick another tenant: the tenant comes from the key, not the query.
    sneaky = client.get(
        "/v1/billing/summary",
        params={"tenant_id": "tenant-2"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert sneaky.json()["tenant_id"] == "tenant-1"
    # ... and a tenant key is not the admin token.
    internal = client.get(
        "/internal/billing/summary",
        params={"tenant_id": "tenant-2"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert internal.status_code == 401

    for headers in ({}, {"Authorization": "Bearer bk_nope_nope"}, {"Authorization": "Basic x"}):
        assert client.get("/v1/billing/summary", headers=headers).status_code == 401

    key_id = key.split("_")[1]
    assert cli(seeded, "keys", "revoke", key_id).returncode == 0
    time.sleep(0.3)
    revoked = client.get("/v1/billing/summary", headers={"Authorization": f"Bearer {key}"})
    assert revoked.status_code == 401
    assert cli(seeded, "keys", "revoke", key_id).returncode == 1


def _stored_hashes(database_url: str) -> list[bytes]:
    import asyncio

    async def read() -> list[bytes]:
        connection = await asyncpg.connect(database_url)
        try:
            return [r[0] for r in await connection.fetch("SELECT key_hash FROM api_keys")]
        finally:
            await connection.close()

    return asyncio.run(read())
