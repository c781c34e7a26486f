"""Tenants and API keys (PostgreSQL): keys are stored as hashes and shown once."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import asyncpg

from services.adapters.errors import AdapterError, DatabaseError

KEY_PREFIX = "bk_"
_TENANT = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}\Z")


class TenantError(AdapterError):
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


def valid_tenant_id(tenant_id: str) -> bool:
    """1-63 of a-z 0-9 . _ - (lower case), starting with a letter or digit."""
    return _TENANT.match(tenant_id) is not None


async def create_tenant(connection: asyncpg.Connection, tenant_id: str) -> None:
    if not valid_tenant_id(tenant_id):
        raise TenantError(f"{tenant_id!r}: a tenant id is 1-63 of a-z 0-9 . _ - (lower case)")
    done = await connection.execute(
        "INSERT INTO tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING", tenant_id
    )
    if done.endswith(" 0"):
        raise TenantError(f"tenant {tenant_id!r} already exists")


async def tenant_exists(connection: asyncpg.Connection, tenant_id: str) -> bool:
    found = await connection.fetchval("SELECT 1 FROM tenants WHERE tenant_id = $1", tenant_id)
    return found is not None


async def create_key(
    connection: asyncpg.Connection, tenant_id: str, name: str = ""
) -> tuple[str, str]:
    """Create a key for the tenant; return (key id, the key itself — shown only now)."""
    if not await tenant_exists(connection, tenant_id):
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


# -- the port the gateway uses ------------------------------------------------------------------


class TenantStore(Protocol):
    """What the gateway asks of tenants and keys (PostgreSQL, or in memory for tests)."""

    async def authenticate(self, key: str) -> tuple[str, str] | None:
        """(tenant id, key id) for an active key; ``None`` for anything else."""
        ...

    async def unknown(self, tenant_ids: Iterable[str], *, create: bool) -> set[str]:
        """Which of ``tenant_ids`` are not tenants; with ``create``, make them tenants and
        return the ones this call created."""
        ...


class PostgresTenantStore:
    """:class:`TenantStore` over a pool; known tenant ids are remembered (a tenant is never
    deleted), so a batch of usage for known tenants costs no round trip."""

    def __init__(self, pool: asyncpg.Pool, timeout: float = 2.0) -> None:
        self.pool = pool
        self.timeout = timeout
        """Seconds a look-up may take (a slow database must not stall ingest)."""
        self._known: set[str] = set()

    async def authenticate(self, key: str) -> tuple[str, str] | None:
        async with self.pool.acquire() as connection:
            return await authenticate(connection, key)

    async def unknown(self, tenant_ids: Iterable[str], *, create: bool) -> set[str]:
        asked = set(tenant_ids) - self._known
        if not asked:
            return set()
        try:
            async with asyncio.timeout(self.timeout):
                return await self._unknown(asked, create)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise DatabaseError(f"cannot look up tenants: {exc!r}") from exc

    async def _unknown(self, asked: set[str], create: bool) -> set[str]:
        async with self.pool.acquire() as connection:
            if create:
                rows = await connection.fetch(
                    "INSERT INTO tenants (tenant_id) SELECT unnest($1::text[])"
                    " ON CONFLICT DO NOTHING RETURNING tenant_id",
                    sorted(asked),
                )
                self._known |= asked
                return {r["tenant_id"] for r in rows}
            rows = await connection.fetch(
                "SELECT tenant_id FROM tenants WHERE tenant_id = ANY($1::text[])", sorted(asked)
            )
        found = {r["tenant_id"] for r in rows}
        self._known |= found
        return asked - found


class InMemoryTenantStore:
    """:class:`TenantStore` in a dict (tests): ``add_key`` returns a usable key."""

    def __init__(self) -> None:
        self.tenants: set[str] = set()
        self._keys: dict[bytes, tuple[str, str]] = {}

    def add_key(self, tenant_id: str, key_id: str) -> str:
        self.tenants.add(tenant_id)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(16)}"
        self._keys[key_hash(key)] = (tenant_id, key_id)
        return key

    def revoke(self, key: str) -> None:
        self._keys.pop(key_hash(key), None)

    async def authenticate(self, key: str) -> tuple[str, str] | None:
        return self._keys.get(key_hash(key))

    async def unknown(self, tenant_ids: Iterable[str], *, create: bool) -> set[str]:
        missing = set(tenant_ids) - self.tenants
        if create:
            self.tenants |= missing
        return missing
