"""The billing query API: transactions (keyset pages, newest first), summaries, and the
drift of computed costs from the upstream-reported ones."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import UTC, date, datetime
from decimal import Context, Decimal, localcontext
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Query, Request

from services.adapters.metrics import REPORTED_COST_TOLERANCE
from services.adapters.readmodels import COST_COLUMNS, COUNT_COLUMNS
from services.core import money
from services.core.money import fmt
from services.gateway.auth import require_admin, require_tenant
from services.gateway.keys import TenantKey
from services.gateway.resources import resources_of

router = APIRouter(prefix="/internal/billing", dependencies=[Depends(require_admin)])

MAX_PAGE = 1000
TRANSACTION_FIELDS = ", ".join(
    (
        "request_id, tenant_id, api_key_id, provider, provider_model_id, model, occurred_at",
        "usage_source",
        *COUNT_COLUMNS,
        *COST_COLUMNS,
        "currency, reported_cost, price_version, revision, priced_at, metadata",
    )
)


def _pool(request: Request) -> asyncpg.Pool:
    return resources_of(request).database()


def _json_row(record: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Decimal):
            out[key] = fmt(value)
        elif isinstance(value, datetime | date):
            out[key] = value.isoformat()
        else:
            out[key] = value
    return out


def _encode_cursor(occurred_at: datetime, request_id: str) -> str:
    raw = f"{occurred_at.isoformat()}|{request_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, request_id = raw.split("|", 1)
        parsed = datetime.fromisoformat(stamp).astimezone(UTC)
        _text(cursor=request_id)
        return parsed, request_id
    except (ValueError, UnicodeDecodeError, OverflowError):
        raise HTTPException(422, "cursor is not one this API returned") from None


def _aware(value: datetime | None, name: str) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise HTTPException(422, f"{name} must carry a timezone (RFC 3339)")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise HTTPException(422, f"{name} is out of range") from None


def _text(**values: str | None) -> None:
    """PostgreSQL text cannot hold NUL: say so rather than fail inside the query."""
    for name, value in values.items():
        if value is not None and "\x00" in value:
            raise HTTPException(422, f"{name} must not contain NUL characters")


@router.get("/transactions")
async def transactions(
    request: Request,
    tenant_id: str,
    api_key_id: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    """One page of a tenant's transactions, newest first; pass ``next_cursor`` for the next."""
    _text(tenant_id=tenant_id, api_key_id=api_key_id, model=model, cursor=cursor)
    conditions: list[str] = ["tenant_id = $1"]
    args: list[Any] = [tenant_id]

    def where(sql: str, value: Any) -> None:
        args.append(value)
        conditions.append(sql.replace("?", f"${len(args)}"))

    if api_key_id is not None:
        where("api_key_id = ?", api_key_id)
    if model is not None:
        where("(model = ? OR provider_model_id = ?)", model)
        # The same rows, narrowed to the canonical model the id resolves to, so the page
        # walks the (tenant_id, model, occurred_at) index instead of every row of the tenant
        # (a provider's id for a model is priced, and stored, under its canonical id).
        if (canonical := resources_of(request).prices.book.resolve(model)) is not None:
            where("model = ?", canonical)
    if (start := _aware(since, "since")) is not None:
        where("occurred_at >= ?", start)
    if (end := _aware(until, "until")) is not None:
        where("occurred_at < ?", end)
    if cursor is not None:
        stamp, last_id = _decode_cursor(cursor)
        args.extend([stamp, last_id])
        conditions.append(f"(occurred_at, request_id) < (${len(args) - 1}, ${len(args)})")
        # Implied by the line above; stated so the months after the cursor are pruned.
        conditions.append(f"occurred_at <= ${len(args) - 1}")
    args.append(limit + 1)
    # Identifiers are constants; every value is a bound parameter.
    sql = (
        f"SELECT {TRANSACTION_FIELDS} FROM billing_transactions"  # noqa: S608
        f" WHERE {' AND '.join(conditions)}"
        f" ORDER BY occurred_at DESC, request_id DESC LIMIT ${len(args)}"
    )
    rows = await _pool(request).fetch(sql, *args)
    page = rows[:limit]
    next_cursor = None
    if len(rows) > limit:
        last = page[-1]
        next_cursor = _encode_cursor(last["occurred_at"], last["request_id"])
    return {"transactions": [_json_row(r) for r in page], "next_cursor": next_cursor}


GROUPS = {"model": "model", "day": "day", "api_key": "api_key_id"}


@router.get("/summary")
async def summary(
    request: Request,
    tenant_id: str,
    since: date | None = None,
    until: date | None = None,
    group_by: Literal["model", "day", "api_key"] = "model",
) -> dict[str, Any]:
    """Totals by model, UTC day or API key over [since, until) (whole UTC days)."""
    _text(tenant_id=tenant_id)
    conditions: list[str] = ["tenant_id = $1"]
    args: list[Any] = [tenant_id]
    if since is not None:
        args.append(since)
        conditions.append(f"day >= ${len(args)}")
    if until is not None:
        args.append(until)
        conditions.append(f"day < ${len(args)}")
    column = GROUPS[group_by]
    sums = ", ".join(
        [f"sum({c})::bigint AS {c}" for c in COUNT_COLUMNS]  # sum(bigint) is numeric
        + [f"sum({c}) AS {c}" for c in COST_COLUMNS]
    )
    rows = await _pool(request).fetch(
        f"SELECT {column} AS {group_by}, {sums} FROM tenant_billing_summary"  # noqa: S608
        f" WHERE {' AND '.join(conditions)} GROUP BY {column} ORDER BY {column}",
        *args,
    )
    groups = [_json_row(r) for r in rows]
    if group_by == "api_key":
        for group in groups:
            group["api_key"] = group["api_key"] or None  # stored as '' when there was none
    totals: dict[str, Any] = {}
    for c in (*COUNT_COLUMNS, *COST_COLUMNS):
        if c in COST_COLUMNS:
            totals[c] = fmt(money.total(r[c] for r in rows))
        else:
            totals[c] = sum(r[c] for r in rows)
    return {
        "tenant_id": tenant_id,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "group_by": group_by,
        "currency": "USD",
        "rows": groups,
        "totals": totals,
    }


# -- drift: our computed cost against the charge the upstream reported -----------------------


@router.get("/drift")
async def drift(
    request: Request,
    since: datetime,
    until: datetime,
    model: str | None = None,
    top: Annotated[int, Query(ge=1, le=100)] = 10,
) -> dict[str, Any]:
    """How far computed costs are from the upstream-reported ones over [since, until).

    Every tenant's transactions count. A row's reported cost is OpenRouter's ``usage.cost``
    or, for BYOK, ``cost_details.upstream_inference_cost``: the upstream's charge for the
    inference, which is what we price (OpenRouter's BYOK fee is not), so BYOK rows are
    included. ``sums`` cover the rows that carry a reported cost (``computed -
    reported``); ``share_within_tolerance`` is the share of those within $0.0001 (strictly,
    as README's accuracy figures). ``worst_models``: the ``top`` models by absolute summed
    difference, each in the same shape.
    """
    _text(model=model)
    start, end = _aware(since, "since"), _aware(until, "until")
    if start is None or end is None or end <= start:
        raise HTTPException(422, "until must be later than since")
    args: list[Any] = [start, end, REPORTED_COST_TOLERANCE]
    condition = "occurred_at >= $1 AND occurred_at < $2"
    if model is not None:
        args.append(model)
        condition += " AND (model = $4 OR provider_model_id = $4)"
    rows = await _pool(request).fetch(
        "SELECT model, count(*) AS transactions, count(reported_cost) AS with_reported_cost,"  # noqa: S608
        " count(*) FILTER (WHERE abs(total_cost - reported_cost) < $3) AS within_tolerance,"
        " coalesce(sum(total_cost) FILTER (WHERE reported_cost IS NOT NULL), 0) AS computed,"
        " coalesce(sum(reported_cost), 0) AS reported,"
        " coalesce(sum(total_cost) FILTER (WHERE reported_cost IS NULL), 0) AS unreported"
        f" FROM billing_transactions WHERE {condition} GROUP BY model",
        *args,
    )
    rows = sorted(rows, key=lambda r: (_gap(r).copy_abs().copy_negate(), r["model"]))
    overall = _drift_group(
        {key: sum(r[key] for r in rows) for key in _DRIFT_COUNTS}
        | {key: money.total(r[key] for r in rows) for key in _DRIFT_SUMS}
    )
    worst = [_drift_group(r, r["model"]) for r in rows[:top]]
    return {
        "since": start.isoformat(),
        "until": end.isoformat(),
        "model": model,
        "currency": "USD",
        "tolerance": fmt(REPORTED_COST_TOLERANCE),
        **overall,
        "worst_models": worst,
    }


_DRIFT_COUNTS = ("transactions", "with_reported_cost", "within_tolerance")
_DRIFT_SUMS = ("computed", "reported", "unreported")


def _gap(r: Mapping[str, Any]) -> Decimal:
    """Computed minus reported, exactly."""
    return money.difference(r["computed"], r["reported"])


def _drift_group(r: Mapping[str, Any], model: str | None = None) -> dict[str, Any]:
    """One block of the drift answer (the whole window, or one model of it)."""
    checked: int = r["with_reported_cost"]
    share = None
    if checked:
        with localcontext(Context(prec=30)):  # a ratio is rounded: not the exact context
            share = str((Decimal(r["within_tolerance"]) / checked).quantize(Decimal("0.0001")))
    group: dict[str, Any] = {} if model is None else {"model": model}
    return group | {
        "counts": {
            "transactions": r["transactions"],
            "with_reported_cost": checked,
            "without_reported_cost": r["transactions"] - checked,
            "within_tolerance": r["within_tolerance"],
        },
        "share_within_tolerance": share,
        "sums": {
            "computed": fmt(r["computed"]),
            "reported": fmt(r["reported"]),
            "difference": fmt(_gap(r)),
            "computed_without_reported_cost": fmt(r["unreported"]),
        },
    }


# -- the same queries for a tenant's own key: its data only ------------------------------------

tenant_router = APIRouter(prefix="/v1/billing")


@tenant_router.get("/transactions")
async def own_transactions(
    request: Request,
    key: Annotated[TenantKey, Depends(require_tenant)],
    api_key_id: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    """The caller's tenant's transactions (see /internal/billing/transactions)."""
    return await transactions(
        request, key.tenant_id, api_key_id, model, since, until, limit, cursor
    )


@tenant_router.get("/summary")
async def own_summary(
    request: Request,
    key: Annotated[TenantKey, Depends(require_tenant)],
    since: date | None = None,
    until: date | None = None,
    group_by: Literal["model", "day", "api_key"] = "model",
) -> dict[str, Any]:
    """The caller's tenant's summary (see /internal/billing/summary)."""
    return await summary(request, key.tenant_id, since, until, group_by)
