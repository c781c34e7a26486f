"""Invoices in PostgreSQL (migration 009): the month's usage and what was invoiced, read
from the read models; an issued invoice written once with its gapless number."""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime
from decimal import Decimal, localcontext
from typing import TYPE_CHECKING, Any

from services.adapters.database import lock_named
from services.adapters.quota import ledgers
from services.core.events import InvoiceIssued
from services.core.invoices import TOKEN_FIELDS, Invoice, Usage
from services.core.money import EXACT, fmt
from services.core.periods import add_months

if TYPE_CHECKING:
    import asyncpg

CLOSE_LOCK = "billing-invoices-close"
"""One close at a time (a transaction-scoped advisory lock on this name)."""


async def lock_closing(connection: asyncpg.Connection) -> None:
    await lock_named(connection, CLOSE_LOCK)


async def unpriced_models(
    connection: asyncpg.Connection, start: datetime, end: datetime, tenant_id: str | None
) -> dict[str, int]:
    """model → requests held unpriced whose ``occurred_at`` is in [start, end)."""
    rows = await connection.fetch(
        "SELECT provider_model_id, count(*) AS n FROM unpriced_usage"
        " WHERE (event->>'occurred_at')::timestamptz >= $1"
        " AND (event->>'occurred_at')::timestamptz < $2"
        " AND ($3::text IS NULL OR tenant_id = $3) GROUP BY 1 ORDER BY 1",
        start,
        end,
        tenant_id,
    )
    return {r["provider_model_id"]: r["n"] for r in rows}


async def tenants_to_invoice(
    connection: asyncpg.Connection, period: date, tenant_id: str | None
) -> list[str]:
    """Tenants with usage up to the end of ``period`` and no invoice for it yet."""
    rows = await connection.fetch(
        "SELECT DISTINCT s.tenant_id FROM tenant_billing_summary s WHERE s.day < $1"
        " AND ($2::text IS NULL OR s.tenant_id = $2) AND NOT EXISTS (SELECT 1 FROM"
        " billing_invoices i WHERE i.tenant_id = s.tenant_id AND i.period = $3)"
        " ORDER BY 1",
        add_months(period, 1),
        tenant_id,
        period,
    )
    return [r["tenant_id"] for r in rows]


async def _invoiced(
    connection: asyncpg.Connection, tenant_id: str, through: date
) -> dict[tuple[date, str], Decimal]:
    """(month, model) → what the tenant's invoices have said of it so far (usage lines and
    adjustments), for the months up to ``through``."""
    rows = await connection.fetch(
        "SELECT period_of, model, sum(exact_amount) AS amount FROM billing_invoice_lines"
        " WHERE tenant_id = $1 AND kind IN ('usage', 'adjustment') AND period_of <= $2"
        " GROUP BY 1, 2",
        tenant_id,
        through,
    )
    return {(r["period_of"], r["model"]): r["amount"] for r in rows}


async def month_usage(connection: asyncpg.Connection, tenant_id: str, period: date) -> list[Usage]:
    """The tenant's usage in ``period``, per model (from the summary: exact sums), less what
    invoices already said of that month (nothing, unless it was swept into a later invoice
    as an adjustment before being closed itself)."""
    rows = await connection.fetch(
        "SELECT model, sum(requests) AS requests, sum(total_cost) AS amount,"
        " sum(uncached_input_tokens) AS uncached_input_tokens,"
        " sum(cache_read_tokens) AS cache_read_tokens,"
        " sum(cache_write_tokens + cache_write_1h_tokens) AS cache_write_tokens,"
        " sum(completion_tokens) AS completion_tokens,"
        " sum(reasoning_tokens) AS reasoning_tokens"
        " FROM tenant_billing_summary WHERE tenant_id = $1 AND day >= $2 AND day < $3"
        " GROUP BY model ORDER BY model",
        tenant_id,
        period,
        add_months(period, 1),
    )
    before = await _invoiced(connection, tenant_id, period)
    usage = []
    with localcontext(EXACT):
        for r in rows:
            said = before.get((period, r["model"]))
            amount = r["amount"] - (said or Decimal(0))
            if amount or (said is None and r["requests"]):  # (free usage is shown too, once)
                tokens = {name: int(r[name]) for name in TOKEN_FIELDS}
                usage.append(Usage(r["model"], int(r["requests"]), tokens, amount))
    return usage


async def adjustments(
    connection: asyncpg.Connection, tenant_id: str, period: date
) -> list[tuple[date, str, Decimal]]:
    """(earlier month, model, its total now − what invoices said of it so far), for every
    earlier month with usage: late usage and re-rating of invoiced months, and the usage of
    a month never closed for this tenant, so nothing is ever left out."""
    invoiced = await _invoiced(connection, tenant_id, add_months(period, -1))
    now = await connection.fetch(
        "SELECT date_trunc('month', day)::date AS month, model, sum(total_cost) AS amount"
        " FROM tenant_billing_summary WHERE tenant_id = $1 AND day < $2 GROUP BY 1, 2",
        tenant_id,
        period,
    )
    change: dict[tuple[date, str], Decimal] = defaultdict(Decimal)
    with localcontext(EXACT):
        for r in now:
            change[(r["month"], r["model"])] += r["amount"]
        for key, amount in invoiced.items():
            change[key] -= amount
    return sorted((month, model, amount) for (month, model), amount in change.items() if amount)


async def credits_position(
    connection: asyncpg.Connection, tenant_id: str
) -> tuple[Decimal, Decimal]:
    """(prepaid credit still to apply, credit applied so far). Still to apply: grants − what
    expired unused (a grant past its expiry and not yet posted counts as expired in full, as
    the ledger counts it) − what invoices applied."""
    ledger = (await ledgers(connection, [tenant_id]))[tenant_id]
    applied = Decimal(
        await connection.fetchval(
            "SELECT coalesce(sum(credits_applied), 0) FROM billing_invoices WHERE tenant_id = $1",
            tenant_id,
        )
    )
    with localcontext(EXACT):
        return ledger.granted - ledger.expired - ledger.lapsed - applied, applied


async def next_sequence(connection: asyncpg.Connection, issuer: str) -> int:
    """The issuer's next number, taken in the caller's transaction (gapless)."""
    await connection.execute(
        "INSERT INTO billing_invoice_numbers (issuer) VALUES ($1) ON CONFLICT DO NOTHING", issuer
    )
    return int(
        await connection.fetchval(
            "UPDATE billing_invoice_numbers SET last_number = last_number + 1"
            " WHERE issuer = $1 RETURNING last_number",
            issuer,
        )
    )


async def insert_invoice(
    connection: asyncpg.Connection, invoice: Invoice, issuer: str, sequence: int, document: str
) -> None:
    await connection.execute(
        "INSERT INTO billing_invoices (number, issuer, sequence, tenant_id, period, issued_at,"
        " subtotal, credits_applied, amount_due, document)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        invoice.number,
        issuer,
        sequence,
        invoice.tenant_id,
        invoice.period,
        invoice.issued_at,
        invoice.subtotal,
        invoice.credits_applied,
        invoice.amount_due,
        document,
    )
    await connection.executemany(
        "INSERT INTO billing_invoice_lines (number, line, kind, tenant_id, model, period_of,"
        " requests, amount, exact_amount) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        [
            (
                invoice.number,
                n,
                line.kind,
                invoice.tenant_id,
                line.model,
                line.period_of,
                line.requests,
                line.amount,
                line.exact_amount,
            )
            for n, line in enumerate(invoice.lines, start=1)
        ],
    )


async def list_invoices(
    connection: asyncpg.Connection, tenant_id: str | None, period: date | None
) -> list[dict[str, Any]]:
    """The issued invoices (of a tenant, of a month) in number order, as the CLI and the API
    list them: money as decimal strings, the amount due to the cent."""
    rows = await connection.fetch(
        "SELECT number, tenant_id, period, issued_at, subtotal, credits_applied, amount_due"
        " FROM billing_invoices WHERE ($1::text IS NULL OR tenant_id = $1)"
        " AND ($2::date IS NULL OR period = $2) ORDER BY issuer, sequence",
        tenant_id,
        period,
    )
    return [
        {
            "number": r["number"],
            "tenant_id": r["tenant_id"],
            "period": f"{r['period']:%Y-%m}",
            "issued_at": r["issued_at"].isoformat().replace("+00:00", "Z"),
            "subtotal": fmt(r["subtotal"]),
            "credits_applied": fmt(r["credits_applied"]),
            "amount_due": format(r["amount_due"], "f"),
        }
        for r in rows
    ]


async def invoice_document(connection: asyncpg.Connection, number: str) -> str | None:
    """The issued JSON document of invoice ``number``, byte for byte, or ``None``."""
    value = await connection.fetchval(
        "SELECT document FROM billing_invoices WHERE number = $1", number
    )
    return None if value is None else str(value)


async def unpublished(connection: asyncpg.Connection) -> list[tuple[str, str, bytes]]:
    """(number, tenant_id, InvoiceIssued JSON) of issued invoices not yet on the topic."""
    rows = await connection.fetch(
        "SELECT number, tenant_id, period, issued_at, currency, subtotal, credits_applied,"
        " amount_due FROM billing_invoices i WHERE NOT EXISTS (SELECT 1 FROM"
        " billing_invoices_published p WHERE p.number = i.number) ORDER BY issuer, sequence"
    )
    return [
        (
            r["number"],
            r["tenant_id"],
            InvoiceIssued(
                number=r["number"],
                tenant_id=r["tenant_id"],
                period=f"{r['period']:%Y-%m}",
                issued_at=r["issued_at"],
                subtotal=r["subtotal"],
                credits_applied=r["credits_applied"],
                amount_due=r["amount_due"],
            )
            .model_dump_json()
            .encode(),
        )
        for r in rows
    ]


async def mark_published(connection: asyncpg.Connection, numbers: list[str]) -> None:
    await connection.execute(
        "INSERT INTO billing_invoices_published (number) SELECT unnest($1::text[])"
        " ON CONFLICT DO NOTHING",
        numbers,
    )
