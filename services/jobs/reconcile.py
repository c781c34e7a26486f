"""Monthly reconciliation: our per-model totals for a UTC month, read from PostgreSQL.

``billing reconcile --month YYYY-MM --invoice FILE.csv`` is the second of the design's two
checks; the first, per request, is ``GET /internal/billing/drift`` and the projector's
``billing_reported_cost_*`` metrics. Reading the export (``services.core.provider_invoice``)
and comparing (``services.core.reconciliation``) are plain functions; this job reads our
side from the database.

Errors: ``ReconcileError``: no comparison could be made (no database, no billing tables);
the CLI reports it with exit status 2.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from services.adapters.errors import DatabaseError

if TYPE_CHECKING:
    import asyncpg


class ReconcileError(Exception):
    """No comparison could be made: no database, no billing tables, a database error."""


async def our_totals(
    connection: asyncpg.Connection,
    start: datetime,
    end: datetime,
    tenant: str | None = None,
    provider: str | None = None,
) -> dict[str, Decimal]:
    """Sum of ``total_cost`` per model of the transactions that occurred in [start, end)."""
    conditions = ["occurred_at >= $1", "occurred_at < $2"]
    args: list[Any] = [start, end]
    for column, value in (("tenant_id", tenant), ("provider", provider)):
        if value is not None:
            args.append(value)
            conditions.append(f"{column} = ${len(args)}")
    rows = await connection.fetch(
        "SELECT model, sum(total_cost) AS total FROM billing_transactions"  # noqa: S608
        f" WHERE {' AND '.join(conditions)} GROUP BY model",
        *args,
    )
    return {r["model"]: r["total"] for r in rows}


async def invoiced_totals(
    connection: asyncpg.Connection, start: datetime, end: datetime, tenant: str | None = None
) -> dict[str, Decimal] | None:
    """Per model, what the issued invoices say of the month [start, end): its usage lines
    plus the adjustments later invoices made to it — or ``None`` while some tenant (in
    scope) with transactions in the month has no invoice for it (the month is not closed)."""
    month = start.date()
    open_tenants = await connection.fetchval(
        "SELECT count(DISTINCT t.tenant_id) FROM billing_transactions t"
        " WHERE t.occurred_at >= $1 AND t.occurred_at < $2"
        " AND ($3::text IS NULL OR t.tenant_id = $3) AND NOT EXISTS (SELECT 1 FROM"
        " billing_invoices i WHERE i.tenant_id = t.tenant_id AND i.period = $4)",
        start,
        end,
        tenant,
        month,
    )
    invoiced = await connection.fetchval(
        "SELECT count(*) FROM billing_invoices WHERE period = $1"
        " AND ($2::text IS NULL OR tenant_id = $2)",
        month,
        tenant,
    )
    if open_tenants or not invoiced:
        return None
    rows = await connection.fetch(
        "SELECT model, sum(exact_amount) AS total FROM billing_invoice_lines"
        " WHERE kind IN ('usage', 'adjustment') AND period_of = $1"
        " AND ($2::text IS NULL OR tenant_id = $2) GROUP BY model",
        month,
        tenant,
    )
    return {r["model"]: r["total"] for r in rows}


async def fetch_totals(
    database_url: str,
    start: datetime,
    end: datetime,
    tenant: str | None = None,
    provider: str | None = None,
) -> tuple[dict[str, Decimal], str]:
    """Our totals and where they come from: the issued invoices of a closed month (and the
    adjustments made to it since), else — a month not closed, or ``provider`` given (invoices
    do not split by provider) — :func:`our_totals`. On a connection of its own; every
    database failure is a ``ReconcileError`` saying what is wrong."""
    import asyncpg  # here: the CLI imports this module, and asyncpg is slow to load

    from services.adapters.database import connection_to

    try:
        async with connection_to(database_url) as connection:
            if provider is None:
                invoiced = await invoiced_totals(connection, start, end, tenant)
                if invoiced is not None:
                    return invoiced, "issued invoices and their adjustments"
            return await our_totals(connection, start, end, tenant, provider), "transactions"
    except DatabaseError as exc:
        raise ReconcileError(str(exc)) from None
    except asyncpg.UndefinedTableError:
        raise ReconcileError("the database has no billing tables (run `billing migrate`)") from None
    except (OSError, asyncpg.PostgresError) as exc:
        raise ReconcileError(f"database error: {exc}") from None
