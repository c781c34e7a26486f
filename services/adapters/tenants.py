"""Tenants and API keys (PostgreSQL): keys are stored as hashes and shown once."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.adapters.errors import RuntimeFault

KEY_PREFIX = "bk_"
_TENANT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class TenantError(RuntimeFault):
    """A tenant or key operation that cannot be done (unknown tenant, bad name, ...)."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    tenant_id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def create_tenant(connection: asyncpg.Connection, tenant_id: str) -> None:
    if not _TENANT.match(tenant_id):
        raise TenantError(f"{tenant_id!r}: a tenant id is 1-63 of a-z 0-9 . _ - (lower case)")
    done = await connection.execute(
        "INSERT INTO tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING", tenant_id
    )
    if done.endswith(" 0"):
        raise TenantError(f"tenant {tenant_id!r} already exists")


async def create_key(
    connection: asyncpg.Connection, tenant_id: str, name: str = ""
) -> tuple[str, str]:
    """Create a key for the tenant; return (key id, the key itself — shown only now)."""
    if await connection.fetchval("SELECT 1 FROM tenants WHERE tenant_id = $1", tenant_id) is None:
        raise TenantError(f"no tenant {tenant_id!r} (create it with `billing tenants create`)")
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    await connection.execute(
        "INSERT INTO api_keys (key_id, tenant_id, name, key_hash) VALUES ($1, $2, $3, $4)",
        key_id,
        tenant_id,
        name,
        key_hash(key),
    )
    return key_id, key


async def list_keys(connection: asyncpg.Connection, tenant_id: str | None = None) -> list[ApiKey]:
    rows = await connection.fetch(
        "SELECT key_id, tenant_id, name, created_at, revoked_at FROM api_keys"
        " WHERE $1::text IS NULL OR tenant_id = $1 ORDER BY tenant_id, created_at",
        tenant_id,
    )
    return [ApiKey(**dict(r)) for r in rows]


async def revoke_key(connection: asyncpg.Connection, key_id: str) -> None:
    done = await connection.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL", key_id
    )
    if done.endswith(" 0"):
        raise TenantError(f"no active key {key_id!r}")


async def authenticate(connection: asyncpg.Connection, key: str) -> tuple[str, str] | None:
    """(tenant id, key id) for an active key; ``None`` for anything else."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    row = await connection.fetchrow(
        "SELECT tenant_id, key_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        key_hash(key),
    )
    return (row["tenant_id"], row["key_id"]) if row else None
