"""Period close: issue each tenant's invoice for a closed UTC month, once (issue #12).

``close_month`` runs in one transaction under a lock (one close at a time): for every tenant
with usage up to the month's end and no invoice for it yet, the month's usage per model, the
adjustments of earlier invoiced months whose totals changed since (late usage, re-rating),
and the prepaid credit still to apply make the invoice (``core.invoices``), numbered gapless
per issuer and stored with its JSON document, which is never changed afterwards (the
database refuses). Closing again issues nothing. A month whose usage is still held unpriced
is not closed unless ``allow_unpriced`` (the models are named either way).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING

from services.adapters import invoices as store
from services.core.invoices import build_invoice, invoice_number
from services.core.periods import month_bounds

if TYPE_CHECKING:
    import asyncpg

DEFAULT_ISSUER = "INV"


class CloseError(Exception):
    """The month cannot be closed (not over yet, or usage held unpriced)."""


@dataclass
class CloseReport:
    month: date
    issued: list[str] = field(default_factory=list)
    """Numbers of the invoices issued by this close."""
    unpriced: dict[str, int] = field(default_factory=dict)
    """model → requests of the month held unpriced (closed anyway: ``allow_unpriced``)."""


async def close_month(
    connection: asyncpg.Connection,
    month: date,
    *,
    now: datetime,
    tenant_id: str | None = None,
    allow_unpriced: bool = False,
    issuer: str = DEFAULT_ISSUER,
) -> CloseReport:
    start, end = month_bounds(month)
    if end > now:
        raise CloseError(f"{month:%Y-%m} is not over yet (it ends {end.isoformat()})")
    report = CloseReport(month)
    async with connection.transaction():
        await store.lock_closing(connection)
        report.unpriced = await store.unpriced_models(connection, start, end, tenant_id)
        if report.unpriced and not allow_unpriced:
            held = ", ".join(f"{model} ({n})" for model, n in report.unpriced.items())
            raise CloseError(
                f"{month:%Y-%m} has usage held unpriced: {held}; set their prices (billing"
                " prices set) so it is billed, or close with --allow-unpriced to bill it later"
                " as an adjustment"
            )
        for tenant in await store.tenants_to_invoice(connection, month, tenant_id):
            usage = await store.month_usage(connection, tenant, month)
            changes = await store.adjustments(connection, tenant, month)
            if not usage and not changes:
                continue
            sequence = await store.next_sequence(connection, issuer)
            invoice = build_invoice(
                number=invoice_number(issuer, month, sequence),
                tenant_id=tenant,
                period=month,
                issued_at=now,
                usage=usage,
                adjustments=changes,
                credits=await store.credits_position(connection, tenant),
            )
            document = json.dumps(invoice.document(), indent=2, ensure_ascii=False) + "\n"
            await store.insert_invoice(connection, invoice, issuer, sequence, document)
            report.issued.append(invoice.number)
    return report


async def publish_issued(connection: asyncpg.Connection, bootstrap: str, topic: str) -> int:
    """Send an ``InvoiceIssued`` for every issued invoice not yet on ``topic``; each is
    marked sent once the broker acknowledged it (at least once). Returns how many."""
    import asyncio

    from services.adapters.kafka import make_producer

    pending = await store.unpublished(connection)
    if not pending:
        return 0
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        sent = [
            await producer.send(topic, event, key=tenant.encode()) for _, tenant, event in pending
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    await store.mark_published(connection, [number for number, _, _ in pending])
    return len(pending)
