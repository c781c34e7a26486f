"""Issued invoices over HTTP (issue #12).

``GET /v1/billing/invoices`` — the calling key's tenant's invoices (its own only).
``GET /v1/billing/invoices/{number}`` — one of them, as JSON (the issued document, byte for
byte), HTML or PDF: chosen by a ``.json`` / ``.html`` / ``.pdf`` suffix, else by the
``Accept`` header (JSON by default). Another tenant's invoice is 404, exactly as one that does
not exist: a key learns nothing of other tenants' numbers.
``GET /internal/billing/invoices?tenant_id&month`` (admin) — every tenant's.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from services.adapters.invoice_documents import render_html, render_pdf
from services.adapters.invoices import invoice_document, list_invoices
from services.core.errors import QuoteRequestError
from services.core.reconciliation import parse_month
from services.gateway.auth import require_admin, require_tenant
from services.gateway.keys import TenantKey
from services.gateway.resources import Deps, Resources

tenant_router = APIRouter(prefix="/v1/billing/invoices")
admin_router = APIRouter(prefix="/internal/billing/invoices", dependencies=[Depends(require_admin)])

FORMATS = {"json": "application/json", "html": "text/html; charset=utf-8", "pdf": "application/pdf"}


@tenant_router.get("")
async def own_invoices(
    resources: Deps, key: Annotated[TenantKey, Depends(require_tenant)]
) -> dict[str, Any]:
    """The calling key's tenant's issued invoices, in number order."""
    async with resources.database().acquire() as connection:
        rows = await list_invoices(connection, key.tenant_id, None)
    return {"invoices": rows}


@tenant_router.get("/{number}")
async def own_invoice(
    request: Request,
    resources: Deps,
    key: Annotated[TenantKey, Depends(require_tenant)],
    number: str,
) -> Response:
    """One of the tenant's invoices as JSON, HTML or PDF (see the module docstring)."""
    return await invoice_response(request, resources, key.tenant_id, number)


async def invoice_response(
    request: Request, resources: Resources, tenant_id: str, number: str
) -> Response:
    """Invoice ``number`` (with its format suffix, or by ``Accept``) if it is ``tenant_id``'s,
    else 404 (shared with the dashboard's download links)."""
    number, form = _format(number, request.headers.get("accept", ""))
    async with resources.database().acquire() as connection:
        document = await invoice_document(connection, number)
    if document is None:
        raise HTTPException(404, f"no invoice {number!r}")
    parsed = orjson.loads(document)
    if parsed.get("tenant_id") != tenant_id:
        raise HTTPException(404, f"no invoice {number!r}")  # not 403: nothing is revealed
    if form == "json":
        body: bytes | str = document
    elif form == "html":  # rendering takes a while (0.3 s for 300 lines): off the loop
        body = await run_in_threadpool(render_html, parsed)
    else:
        body = await run_in_threadpool(render_pdf, parsed)
    headers = {"content-disposition": f'inline; filename="{number}.{form}"'}
    return Response(body, media_type=FORMATS[form], headers=headers)


def _format(number: str, accept: str) -> tuple[str, str]:
    """(the number, json|html|pdf) from a suffix, else from ``Accept`` (JSON by default)."""
    stem, dot, suffix = number.rpartition(".")
    if dot and suffix in FORMATS:
        return stem, suffix
    accepted = accept.lower()
    if "application/pdf" in accepted:
        return number, "pdf"
    if "text/html" in accepted:
        return number, "html"
    return number, "json"


@admin_router.get("")
async def all_invoices(
    resources: Deps, tenant_id: str | None = None, month: str | None = None
) -> dict[str, Any]:
    """Every issued invoice (of one tenant, of one month: ``month`` is YYYY-MM)."""
    period: date | None = None
    if month is not None:
        try:
            period = parse_month(month)[0].date()
        except ValueError as exc:
            raise QuoteRequestError("month", str(exc).removeprefix("--month ")) from None
    async with resources.database().acquire() as connection:
        rows = await list_invoices(connection, tenant_id, period)
    return {"invoices": rows}
