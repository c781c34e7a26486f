"""The credit ledger in PostgreSQL (``billing_credit_grants``, migration 007): grants are
appended, never changed; a grant with an idempotency key is recorded once per tenant."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from services.adapters.errors import AdapterError
from services.adapters.tenants import tenant_exists
from services.core.credits import Grant

if TYPE_CHECKING:
    import asyncpg


class LedgerError(AdapterError):
    """A grant that cannot be recorded: ``status`` is 404 (no such tenant) or 409 (its
    idempotency key was used for another grant)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _row(record: Any) -> dict[str, Any]:
    def when(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat().replace("+00:00", "Z")

    amount: Decimal = record["amount"]
    return {
        "grant_id": record["grant_id"],
        "tenant_id": record["tenant_id"],
        "amount": str(amount),
        "reason": record["reason"],
        "idempotency_key": record["idempotency_key"],
        "expires_at": when(record["expires_at"]),
        "granted_at": when(record["granted_at"]),
    }


_INSERT = """
    INSERT INTO billing_credit_grants (tenant_id, amount, reason, idempotency_key, expires_at)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
    RETURNING grant_id, tenant_id, amount, reason, idempotency_key, expires_at, granted_at
"""
_SELECT = """
    SELECT grant_id, tenant_id, amount, reason, idempotency_key, expires_at, granted_at
    FROM billing_credit_grants WHERE tenant_id = $1
"""


async def add_grant(connection: asyncpg.Connection, grant: Grant) -> tuple[dict[str, Any], bool]:
    """Record ``grant``; return it as stored and whether it is new (``False``: the same
    grant was recorded before under its idempotency key)."""
    async with connection.transaction():
        if not await tenant_exists(connection, grant.tenant_id):
            raise LedgerError(f"no tenant {grant.tenant_id!r}", 404)
        inserted = await connection.fetchrow(
            _INSERT,
            grant.tenant_id,
            grant.amount,
            grant.reason,
            grant.idempotency_key,
            grant.expires_at,
        )
        if inserted is not None:
            return _row(inserted), True
        earlier = await connection.fetchrow(
            _SELECT + " AND idempotency_key = $2",
            grant.tenant_id,
            grant.idempotency_key,
        )
    same = (earlier["amount"], earlier["reason"], earlier["expires_at"]) == (
        grant.amount,
        grant.reason,
        grant.expires_at,
    )
    if not same:
        raise LedgerError(
            f"idempotency key {grant.idempotency_key!r} was used for another grant"
            f" (grant {earlier['grant_id']}: {earlier['amount']} USD)",
            409,
        )
    return _row(earlier), False


async def list_grants(connection: asyncpg.Connection, tenant_id: str) -> list[dict[str, Any]]:
    """The tenant's grants, oldest first."""
    rows = await connection.fetch(_SELECT + " ORDER BY grant_id", tenant_id)
    return [_row(row) for row in rows]
