"""The dashboard's pages and the JSON its page script reads (issue #13).

Pages: ``GET /dashboard`` (the sign-in form, or the signed-in viewer's page),
``GET /dashboard/tenants/{id}`` (an operator looking at one tenant), ``POST
/dashboard/sign-in``, ``POST /dashboard/sign-out``, ``GET /dashboard/invoices/{number}``
(a download). Data: ``GET /dashboard/api/…``. Everything takes the session cookie
(``session.py``), never a key: a tenant's session reads its own tenant only, and any other
tenant's id, request or invoice is 404, exactly as one that does not exist.

The page polls ``/dashboard/api/overview`` (and the first page of transactions) every
``REFRESH_SECONDS``; answers come from the summary tables and are reused for a second
(``state.AnswerCache``), so open pages cost the database the same at any traffic.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.staticfiles import StaticFiles

from services.adapters import dashboard as reads
from services.adapters.dashboard import Viewer
from services.adapters.readmodels import COST_COLUMNS, COUNT_COLUMNS
from services.core import dashboard as shown
from services.core.dashboard import Step, Window
from services.core.money import ZERO, fmt
from services.core.periods import month_of
from services.gateway import queries
from services.gateway.auth import Unauthorized, tenant_of
from services.gateway.dashboard.session import (
    CSRF_COOKIE,
    PATH,
    SESSION_COOKIE,
    SessionKeys,
    same_origin,
)
from services.gateway.invoices_api import invoice_response
from services.gateway.quota_api import read_balance
from services.gateway.resources import Deps, Resources

router = APIRouter(prefix=PATH, include_in_schema=False)
STATIC = Path(__file__).parent / "static"

REFRESH_SECONDS = 2
MAX_FORM_BYTES = 8192
PAGE = 25
"""Transactions per page."""

HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}

TEMPLATES = Environment(
    loader=PackageLoader("services.gateway.dashboard", "templates"),
    autoescape=select_autoescape(["html"]),
    enable_async=False,
)


@dataclass(frozen=True, slots=True)
class Signed:
    """A live session: who it is, and its id (for its sign-out form's CSRF token)."""

    viewer: Viewer
    session_id: str


async def signed_in(request: Request, resources: Resources) -> Signed | None:
    keys = resources.dashboard.keys
    session_id = keys.session_id(request.cookies.get(SESSION_COOKIE))
    if session_id is None or resources.pool is None:
        return None
    async with resources.pool.acquire() as connection:
        viewer = await reads.live_session(connection, SessionKeys.digest(session_id))
    return None if viewer is None else Signed(viewer, session_id)


async def _session(request: Request, resources: Deps) -> Signed:
    signed = await signed_in(request, resources)
    if signed is None:
        raise HTTPException(401, "not signed in (sign in at /dashboard)")
    return signed


Session = Annotated[Signed, Depends(_session)]


async def _operator(signed: Session) -> Signed:
    if signed.viewer.role != "operator":
        raise HTTPException(404, "Not Found")
    return signed


def tenant_in_view(signed: Signed, tenant_id: str | None) -> str:
    """The tenant a data request is about: a tenant's own (another id is 404, as if it did not
    exist), or, for an operator, the one named."""
    viewer = signed.viewer
    if viewer.role == "tenant":
        if tenant_id is not None and tenant_id != viewer.tenant_id:
            raise HTTPException(404, "Not Found")
        assert viewer.tenant_id is not None  # noqa: S101  # a tenant session names its tenant
        return viewer.tenant_id
    if not tenant_id:
        raise HTTPException(422, "tenant_id is required")
    if "\x00" in tenant_id:
        raise HTTPException(422, "tenant_id must not contain NUL characters")
    return tenant_id


def _page(template: str, status: int = 200, **values: Any) -> HTMLResponse:
    body = TEMPLATES.get_template(template).render(refresh_seconds=REFRESH_SECONDS, **values)
    return HTMLResponse(body, status_code=status, headers=HEADERS)


def _cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def static_files() -> StaticFiles:
    """The page script, styles and the vendored chart library, at ``/dashboard/static``."""
    return StaticFiles(directory=STATIC)


# -- pages ----------------------------------------------------------------------------------------


@router.get("")
async def home(request: Request, resources: Deps) -> Response:
    """The viewer's page, or the sign-in form."""
    signed = await signed_in(request, resources)
    if signed is None:
        return _sign_in_page(request, resources)
    if signed.viewer.role == "operator":
        return _page("operator.html", csrf=_csrf(resources, signed), viewer=signed.viewer)
    return await _tenant_page(resources, signed, signed.viewer.tenant_id or "")


@router.get("/tenants/{tenant_id}")
async def tenant_page(request: Request, resources: Deps, tenant_id: str) -> Response:
    """An operator's view of one tenant (a tenant's own id redirects to /dashboard)."""
    signed = await signed_in(request, resources)
    if signed is None:
        return RedirectResponse(PATH, 303)
    if signed.viewer.role == "tenant" and tenant_id == signed.viewer.tenant_id:
        return RedirectResponse(PATH, 303)
    return await _tenant_page(resources, signed, tenant_in_view(signed, tenant_id))


async def _tenant_page(resources: Resources, signed: Signed, tenant_id: str) -> Response:
    overview = await _overview(resources, signed.viewer, tenant_id)
    return _page(
        "tenant.html",
        csrf=_csrf(resources, signed),
        viewer=signed.viewer,
        tenant_id=tenant_id,
        overview=overview,
    )


def _csrf(resources: Resources, signed: Signed) -> str:
    return resources.dashboard.keys.csrf(signed.session_id)


def _sign_in_page(
    request: Request, resources: Resources, error: str | None = None, status: int = 200
) -> Response:
    form = resources.dashboard.keys.sign_in_form()
    operator = resources.settings.admin_token is not None
    response = _page("sign_in.html", status, csrf=form.token, error=error, operator=operator)
    _cookie(response, request, CSRF_COOKIE, form.nonce, 3600)
    return response


async def _form(request: Request) -> dict[str, str]:
    """An url-encoded form of at most ``MAX_FORM_BYTES``, from this site."""
    if not same_origin(
        request.headers.get("origin"), request.headers.get("host"), request.url.scheme
    ):
        raise HTTPException(403, "cross-site form refused")
    if int(request.headers.get("content-length") or 0) > MAX_FORM_BYTES:
        raise HTTPException(413, "form too large")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, "form too large")
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True, max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "the form could not be read") from None
    return {name: values[0] for name, values in fields.items()}


@router.post("/sign-in")
async def sign_in(request: Request, resources: Deps) -> Response:
    """Sign in with a tenant API key (the tenant's view) or the admin token (every tenant)."""
    form = await _form(request)
    keys = resources.dashboard.keys
    if not keys.sign_in_matches(request.cookies.get(CSRF_COOKIE), form.get("csrf", "")):
        return _sign_in_page(request, resources, "The form expired. Please sign in again.", 400)
    credential = form.get("credential", "").strip()
    viewer = await _viewer_of(resources, credential)
    if isinstance(viewer, str):
        return _sign_in_page(request, resources, viewer, 401)
    session_id = keys.new_session_id()
    expires = datetime.now(UTC) + timedelta(seconds=keys.max_age)
    async with resources.database().acquire() as connection:
        await reads.open_session(connection, keys.digest(session_id), viewer, expires)
    response = RedirectResponse(PATH, 303, headers={"cache-control": "no-store"})
    _cookie(response, request, SESSION_COOKIE, keys.cookie(session_id), keys.max_age)
    response.delete_cookie(CSRF_COOKIE, path=PATH)
    return response


async def _viewer_of(resources: Resources, credential: str) -> Viewer | str:
    """Who ``credential`` signs in as, or why it cannot (a message for the form)."""
    if not credential:
        return "Enter a tenant API key or the admin token."
    token = resources.settings.admin_token
    if token is not None and hmac.compare_digest(
        credential.encode(), token.get_secret_value().encode()
    ):
        return Viewer("operator")
    try:
        key = await tenant_of(resources, credential)
    except Unauthorized as exc:
        if exc.status == 503:
            return "Keys cannot be checked: the gateway has no database."
        return "That key is unknown or revoked."
    return Viewer("tenant", key.tenant_id, key.key_id)


@router.post("/sign-out")
async def sign_out(request: Request, resources: Deps) -> Response:
    """End the session (every gateway process refuses its cookie from now on)."""
    form = await _form(request)
    signed = await signed_in(request, resources)
    response = RedirectResponse(PATH, 303, headers={"cache-control": "no-store"})
    if signed is not None:
        if not resources.dashboard.keys.csrf_matches(signed.session_id, form.get("csrf", "")):
            raise HTTPException(403, "the sign-out form is not this session's")
        async with resources.database().acquire() as connection:
            await reads.end_session(connection, SessionKeys.digest(signed.session_id))
    response.delete_cookie(SESSION_COOKIE, path=PATH)
    return response


@router.get("/invoices/{number}")
async def invoice_download(
    request: Request, resources: Deps, signed: Session, number: str, tenant_id: str | None = None
) -> Response:
    """One of the tenant's invoices (``.json``, ``.html`` or ``.pdf``)."""
    tenant = tenant_in_view(signed, tenant_id)
    return await invoice_response(request, resources, tenant, number)


# -- a tenant's data ------------------------------------------------------------------------------


def _json(body: Any) -> Response:
    from services.gateway.responses import ORJSONResponse

    return ORJSONResponse(body, headers=HEADERS)


@router.get("/api/overview")
async def overview(resources: Deps, signed: Session, tenant_id: str | None = None) -> Response:
    """Spend this month and today, balance and budgets (what the page polls)."""
    tenant = tenant_in_view(signed, tenant_id)
    return _json(await _overview(resources, signed.viewer, tenant))


async def _overview(resources: Resources, viewer: Viewer, tenant_id: str) -> dict[str, Any]:
    key_id = viewer.api_key_id or "" if viewer.role == "tenant" else ""

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
    held = Decimal(view["reserved"]) + Decimal(view["pending"])
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
            "held": shown.money(limit - spent - remaining),
            "remaining": shown.money(remaining),
            "spent_share": shown.share(spent, limit),
            "used_share": shown.share(limit - remaining, limit),
        }
    return out


@router.get("/api/series")
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


@router.get("/api/breakdown")
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
        spend = sum((cost for _, _, cost in rows), ZERO)
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


@router.get("/api/transactions")
async def transactions(
    request: Request,
    signed: Session,
    tenant_id: str | None = None,
    model: str | None = None,
    api_key_id: str | None = None,
    since: date | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = PAGE,
) -> Response:
    """A page of the tenant's latest transactions (keyset paging, newest first)."""
    tenant = tenant_in_view(signed, tenant_id)
    start = datetime(since.year, since.month, since.day, tzinfo=UTC) if since else None
    page = await queries.transactions(
        request, tenant, api_key_id or None, model or None, start, None, limit, cursor or None
    )
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


@router.get("/api/transactions/{request_id}")
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


@router.get("/api/invoices")
async def invoices(resources: Deps, signed: Session, tenant_id: str | None = None) -> Response:
    """The tenant's issued invoices, newest first, with their download paths."""
    from services.adapters.invoices import list_invoices

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
                    "links": {f: f"{PATH}/invoices/{r['number']}.{f}{query}" for f in FORMATS},
                }
                for r in reversed(rows)
            ]
        }
    )


FORMATS = ("pdf", "html", "json")


# -- every tenant: the operator's view ------------------------------------------------------------


@router.get("/api/operator/tenants", dependencies=[Depends(_operator)])
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
            sum((r["recent_cost"] for r in rows), ZERO),
            now,
        )
        return {
            "as_of": now.isoformat(timespec="seconds"),
            "month": month_of(now).isoformat(),
            "rate": total_rate.json(),
            "month_total": shown.money(sum((r["cost"] for r in rows), ZERO)),
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


@router.get("/api/operator/pipeline", dependencies=[Depends(_operator)])
async def pipeline(resources: Deps) -> Response:
    """Each pipeline service's lag, throughput and dead letters (from its metrics), usage
    held unpriced by model, and this gateway process's spool."""
    services = await resources.dashboard.probe.services()
    async with resources.database().acquire() as connection:
        unpriced = await reads.unpriced_by_model(connection)
    spool = resources.emitter.spool
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
            "spool_bytes": spool.size_bytes,
            "broker": "ok" if resources.publisher is not None else "unavailable",
        }
    )


@router.get("/api/operator/changes", dependencies=[Depends(_operator)])
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


@router.get("/api/operator/drift", dependencies=[Depends(_operator)])
async def drift(request: Request, resources: Deps) -> Response:
    """Computed against upstream-reported cost over the last hour (as
    ``/internal/billing/drift``), reused for a minute: it reads the hour's transactions."""

    async def read() -> dict[str, Any]:
        now = datetime.now(UTC)
        answer: dict[str, Any] = await queries.drift(request, now - DRIFT_WINDOW, now, None, 5)
        return answer

    cache = resources.dashboard.drift
    return _json(await cache.get(("drift",), read))
