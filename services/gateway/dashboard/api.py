"""The JSON the dashboard's page script reads, under ``/dashboard/api`` (session cookie only).

A tenant's figures: ``overview`` (this month and today, balance and budgets: what the page
polls every ``REFRESH_SECONDS``), ``series`` (by hour or day), ``breakdown`` (by model or
API key), ``transactions`` (keyset pages, and one request's breakdown) and ``invoices``; an
operator names the tenant with ``tenant_id``. The operator's: ``operator/tenants``
(ranked, with rates now), ``operator/pipeline``, ``operator/changes``, ``operator/drift``.

Answers come from the summary tables and are reused for a second in each gateway process
(``state.AnswerCache``), so pages polling cost the database the same at any traffic.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response

from services.adapters import dashboard as reads
from services.adapters.dashboard import Viewer
from services.adapters.invoices import list_invoices
from services.adapters.readmodels import COST_COLUMNS, COUNT_COLUMNS
from services.core import dashboard as shown
from services.core.dashboard import Step, Window
from services.core.money import difference, fmt, total
from services.core.periods import month_of
from services.gateway import queries
from services.gateway.dashboard.access import (
    SECURITY_HEADERS,
    Session,
    require_operator,
    tenant_in_view,
)
from services.gateway.dashboard.session import PATH
from services.gateway.quota_api import read_balance
from services.gateway.resources import Deps, Resources
from services.gateway.responses import ORJSONResponse
from services.gateway.spool import spooled_bytes

router = APIRouter(prefix=f"{PATH}/api", include_in_schema=False)

REFRESH_SECONDS = 2
PAGE = 25
"""Transactions per page."""
INVOICE_FORMATS = ("pdf", "html", "json")


def _json(body: Any) -> Response:
    return ORJSONResponse(body, headers=SECURITY_HEADERS)


@router.get("/overview")
async def overview(resources: Deps, signed: Session, tenant_id: str | None = None) -> Response:
    """Spend this month and today, balance and budgets (what the page polls)."""
    tenant = tenant_in_view(signed, tenant_id)
    return _json(await overview_of(resources, signed.viewer, tenant))


async def overview_of(resources: Resources, viewer: Viewer, tenant_id: str) -> dict[str, Any]:
    # A tenant's page shows its own key's budget too; an operator's shows the tenant's.
    key_id = (viewer.api_key_id or "") if viewer.role == "tenant" else ""

    async def read() -> dict[str, Any]:
        now = datetime.now(UTC)
        month = month_of(now)
        async with resources.database().acquire() as connection:
            month_spend = await reads.spend_since_day(connection, tenant_id, month)
            today_spend = await reads.spend_since_day(connection, tenant_id, now.date())
            balance = await read_balance(
                connection,
                tenant_id,
                key_id,
                require_credits=resources.settings.require_credits,
                now=now,
            )
        return {
            "tenant_id": tenant_id,
            "as_of": now.isoformat(timespec="seconds"),
            "month": {"start": month.isoformat(), "requests": month_spend[0]}
            | shown.money(month_spend[1]),
            "today": {"start": now.date().isoformat(), "requests": today_spend[0]}
            | shown.money(today_spend[1]),
            "balance": _balance(balance),
        }

    answer: dict[str, Any] = await resources.dashboard.answers.get(
        ("overview", tenant_id, key_id), read
    )
    return answer


def _balance(view: dict[str, Any]) -> dict[str, Any]:
    """The balance answer with each amount as :func:`shown.money` and each gauge's fill."""
    amounts = ("balance", "reserved", "pending", "available")
    out: dict[str, Any] = {k: shown.money(Decimal(view[k])) for k in amounts}
    held = total((Decimal(view["reserved"]), Decimal(view["pending"])))
    out["held"] = shown.money(held)
    out["held_share"] = shown.share(held, Decimal(view["balance"]))
    out["prepaid"] = view["prepaid"]
    for name in ("budget", "key_budget"):
        budget = view.get(name)
        if budget is None:
            out[name] = None
            continue
        limit, spent = Decimal(budget["limit"]), Decimal(budget["spent"])
        remaining = Decimal(budget["remaining"])
        out[name] = {
            "period": budget["period"],
            "hard": budget["hard"],
            "limit": shown.money(limit),
            "spent": shown.money(spent),
            "held": shown.money(difference(difference(limit, spent), remaining)),
            "remaining": shown.money(remaining),
            "spent_share": shown.share(spent, limit),
            "used_share": shown.share(difference(limit, remaining), limit),
        }
    return out


@router.get("/series")
async def series(
    resources: Deps,
    signed: Session,
    step: Step = "hour",
    window: Window = "24h",
    tenant_id: str | None = None,
) -> Response:
    """Spend and requests per UTC hour or day over the last 24 hours or 30 days."""
    tenant = tenant_in_view(signed, tenant_id)

    async def read() -> dict[str, Any]:
        now = datetime.now(UTC)
        start, _ = shown.series_bounds(now, step, window)
        async with resources.database().acquire() as connection:
            if step == "hour":
                rows = await reads.spend_by_hour(connection, tenant, start)
            else:
                rows = shown.day_rows(await reads.spend_by_day(connection, tenant, start.date()))
        points = shown.series(rows, now, step, window)
        return {"step": step, "window": window, "points": [p.json() for p in points]}

    return _json(await resources.dashboard.answers.get(("series", tenant, step, window), read))


@router.get("/breakdown")
async def breakdown(
    resources: Deps,
    signed: Session,
    by: Literal["model", "api_key"] = "model",
    tenant_id: str | None = None,
) -> Response:
    """This month's spend by model or by API key, largest first."""
    tenant = tenant_in_view(signed, tenant_id)

    async def read() -> dict[str, Any]:
        month = month_of(datetime.now(UTC))
        column: Literal["model", "api_key_id"] = "model" if by == "model" else "api_key_id"
        async with resources.database().acquire() as connection:
            rows = await reads.spend_by(connection, tenant, column, month)
            names = await reads.key_names(connection, tenant) if by == "api_key" else {}
        spend = total(cost for _, _, cost in rows)
        return {
            "by": by,
            "month": month.isoformat(),
            "rows": [
                {
                    "name": name or None,
                    "label": names.get(name) or name or "(no key)",
                    "requests": requests,
                    "share": shown.share(cost, spend),
                }
                | shown.money(cost)
                for name, requests, cost in rows
            ],
        }

    return _json(await resources.dashboard.answers.get(("breakdown", tenant, by), read))


@router.get("/transactions")
async def transactions(
    request: Request,
    resources: Deps,
    signed: Session,
    tenant_id: str | None = None,
    model: str | None = None,
    api_key_id: str | None = None,
    since: date | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = PAGE,
) -> Response:
    """A page of the tenant's latest transactions (keyset paging, newest first); the newest
    page, which open pages poll, is reused for a second."""
    tenant = tenant_in_view(signed, tenant_id)
    start = datetime(since.year, since.month, since.day, tzinfo=UTC) if since else None

    async def read() -> dict[str, Any]:
        page: dict[str, Any] = await queries.transactions(
            request, tenant, api_key_id or None, model or None, start, None, limit, cursor or None
        )
        return page

    if cursor or since or limit != PAGE:  # only the page the browser polls is reused
        page = await read()
    else:
        key = ("transactions", tenant, model, api_key_id)
        page = await resources.dashboard.answers.get(key, read)
    rows = [
        {
            "request_id": row["request_id"],
            "occurred_at": row["occurred_at"],
            "model": row["model"],
            "api_key_id": row["api_key_id"],
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"],
            "revision": row["revision"],
        }
        | shown.money(Decimal(row["total_cost"]))
        for row in page["transactions"]
    ]
    return _json({"transactions": rows, "next_cursor": page["next_cursor"]})


DETAIL_COLUMNS = ", ".join(
    (
        "request_id, api_key_id, provider, provider_model_id, model, occurred_at, recorded_at",
        "usage_source",
        *COUNT_COLUMNS,
        *COST_COLUMNS,
        "reported_cost, price_version, revision, priced_at",
    )
)


@router.get("/transactions/{request_id}")
async def transaction(
    resources: Deps, signed: Session, request_id: str, tenant_id: str | None = None
) -> Response:
    """One request's cost breakdown: tokens (cached, reasoning…), each cost component, the
    price version, and its revisions."""
    tenant = tenant_in_view(signed, tenant_id)
    if "\x00" in request_id:
        raise HTTPException(404, "Not Found")
    async with resources.database().acquire() as connection:
        row = await reads.transaction_of(connection, tenant, request_id, DETAIL_COLUMNS)
        if row is None:
            raise HTTPException(404, "Not Found")
        revisions = await reads.revisions_of(connection, tenant, request_id)
    detail: dict[str, Any] = {}
    for name, value in row.items():
        if name in COST_COLUMNS or name == "reported_cost":
            detail[name] = None if value is None else shown.money(value)
        elif isinstance(value, datetime):
            detail[name] = value.isoformat()
        else:
            detail[name] = value
    detail["revisions"] = [
        {
            "from": r["old_revision"],
            "to": r["new_revision"],
            "old_total": shown.money(r["old_total_cost"]),
            "new_total": shown.money(r["new_total_cost"]),
            "delta": shown.money(r["delta_cost"]),
            "price_version": r["price_version"],
            "reason": r["reason"],
            "at": r["created_at"].isoformat(),
        }
        for r in revisions
    ]
    return _json(detail)


@router.get("/invoices")
async def invoices(resources: Deps, signed: Session, tenant_id: str | None = None) -> Response:
    """The tenant's issued invoices, newest first, with their download paths."""
    tenant = tenant_in_view(signed, tenant_id)
    async with resources.database().acquire() as connection:
        rows = await list_invoices(connection, tenant, None)
    query = f"?tenant_id={quote(tenant)}" if signed.viewer.role == "operator" else ""
    return _json(
        {
            "invoices": [
                {
                    "number": r["number"],
                    "period": r["period"],
                    "issued_at": r["issued_at"],
                    "amount_due": shown.money(Decimal(r["amount_due"])),
                    "subtotal": shown.money(Decimal(r["subtotal"])),
                    "links": {
                        f: f"{PATH}/invoices/{r['number']}.{f}{query}" for f in INVOICE_FORMATS
                    },
                }
                for r in reversed(rows)
            ]
        }
    )


# -- every tenant: the operator's view ------------------------------------------------------------


@router.get("/operator/tenants", dependencies=[Depends(require_operator)])
async def tenants(resources: Deps) -> Response:
    """Every tenant by this month's spend, with today's and the per-minute rates now."""

    async def read() -> dict[str, Any]:
        now = datetime.now(UTC)
        async with resources.database().acquire() as connection:
            rows = await reads.tenants_ranked(
                connection, month_of(now), now.date(), shown.rate_window(now)
            )
        total_rate = shown.rate_now(
            sum(r["recent_requests"] for r in rows),
            total(r["recent_cost"] for r in rows),
            now,
        )
        return {
            "as_of": now.isoformat(timespec="seconds"),
            "month": month_of(now).isoformat(),
            "rate": total_rate.json(),
            "month_total": shown.money(total(r["cost"] for r in rows)),
            "tenants": [
                {
                    "tenant_id": r["tenant_id"],
                    "requests": r["requests"],
                    "month": shown.money(r["cost"]),
                    "today": shown.money(r["today_cost"]),
                    "today_requests": r["today_requests"],
                }
                | shown.rate_now(r["recent_requests"], r["recent_cost"], now).json()
                for r in rows
            ],
        }

    return _json(await resources.dashboard.answers.get(("tenants",), read))


@router.get("/operator/pipeline", dependencies=[Depends(require_operator)])
async def pipeline(resources: Deps) -> Response:
    """Each pipeline service's lag, throughput and dead letters (from its metrics), usage
    held unpriced by model, and what this gateway's workers hold in their spools."""
    services = await resources.dashboard.probe.services()

    async def read() -> list[dict[str, Any]]:
        async with resources.database().acquire() as connection:
            return await reads.unpriced_by_model(connection)

    unpriced = await resources.dashboard.answers.get(("unpriced",), read)
    spooled = await resources.dashboard.answers.get(
        ("spool",), lambda: asyncio.to_thread(spooled_bytes, resources.settings.usage_spool_dir)
    )
    return _json(
        {
            "services": [s.json() for s in services],
            "configured": bool(resources.settings.pipeline_endpoints),
            "dead_lettered": sum(s.dead_lettered for s in services),
            "unpriced": [
                {
                    "model": r["model"],
                    "requests": r["requests"],
                    "oldest": r["oldest"].isoformat(),
                }
                for r in unpriced
            ],
            "spool_bytes": spooled,
            "broker": "ok" if resources.publisher is not None else "unavailable",
        }
    )


@router.get("/operator/changes", dependencies=[Depends(require_operator)])
async def changes(resources: Deps) -> Response:
    """The latest price corrections and re-rating runs."""
    async with resources.database().acquire() as connection:
        corrections = await reads.recent_corrections(connection, 10)
        runs = await reads.recent_reprice_runs(connection, 10)
    return _json(
        {
            "corrections": [_plain(r) for r in corrections],
            "reprice_runs": [_plain(r) for r in runs],
        }
    )


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.isoformat() if isinstance(v, datetime) else fmt(v) if isinstance(v, Decimal) else v
        for k, v in row.items()
    }


DRIFT_WINDOW = timedelta(hours=1)


@router.get("/operator/drift", dependencies=[Depends(require_operator)])
async def drift(request: Request, resources: Deps) -> Response:
    """Computed against upstream-reported cost over the last hour (as
    ``/internal/billing/drift``), reused for a minute: it reads the hour's transactions."""

    async def read() -> dict[str, Any]:
        now = datetime.now(UTC)
        answer: dict[str, Any] = await queries.drift(request, now - DRIFT_WINDOW, now, None, 5)
        return answer

    cache = resources.dashboard.drift
    return _json(await cache.get(("drift",), read))
