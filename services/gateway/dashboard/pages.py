"""The dashboard's pages: the sign-in form, sign-in and sign-out, the tenant and operator
pages (server-rendered, then filled and kept live by ``static/dashboard.js`` from ``api.py``),
invoice downloads, and the static assets.

``GET /dashboard`` is the sign-in form, or the signed-in viewer's page; ``GET
/dashboard/tenants/{id}`` an operator's view of one tenant; ``POST /dashboard/sign-in`` and
``POST /dashboard/sign-out`` (CSRF-checked forms, ``session.py``); ``GET
/dashboard/invoices/{number}`` one of the tenant's invoices as PDF, HTML or JSON.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.staticfiles import StaticFiles

from services.adapters import dashboard as reads
from services.adapters.dashboard import Viewer
from services.gateway.auth import (
    Unauthorized,
    client_address,
    failed,
    refuse_if_limited,
    same_secret,
    tenant_of,
)
from services.gateway.dashboard.access import (
    DOWNLOAD_HEADERS,
    SECURITY_HEADERS,
    Session,
    Signed,
    admin_fingerprint,
    forget_session,
    signed_in,
    site_of,
    tenant_in_view,
)
from services.gateway.dashboard.api import REFRESH_SECONDS, overview_of
from services.gateway.dashboard.session import (
    CSRF_COOKIE,
    PATH,
    SESSION_COOKIE,
    SessionKeys,
    same_origin,
)
from services.gateway.invoices_api import invoice_response
from services.gateway.resources import Deps, Resources

router = APIRouter(prefix=PATH, include_in_schema=False)
STATIC = Path(__file__).parent / "static"
MAX_FORM_BYTES = 8192

TEMPLATES = Environment(
    loader=PackageLoader("services.gateway.dashboard", "templates"),
    autoescape=select_autoescape(["html"]),
)


def _page(template: str, status: int = 200, **values: Any) -> HTMLResponse:
    body = TEMPLATES.get_template(template).render(refresh_seconds=REFRESH_SECONDS, **values)
    return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)


def _cookie(response: Response, site: str, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PATH,
        httponly=True,
        samesite="strict",
        secure=site.startswith("https://"),
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
    overview = await overview_of(resources, signed.viewer, tenant_id)
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
    _cookie(response, site_of(request, resources), CSRF_COOKIE, form.nonce, 3600)
    return response


async def _form(request: Request, resources: Resources) -> dict[str, str]:
    """An url-encoded form of at most ``MAX_FORM_BYTES``, from this site."""
    if not same_origin(request.headers.get("origin"), site_of(request, resources)):
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
    form = await _form(request, resources)
    keys = resources.dashboard.keys
    if not keys.sign_in_matches(request.cookies.get(CSRF_COOKIE), form.get("csrf", "")):
        return _sign_in_page(request, resources, "The form expired. Please sign in again.", 400)
    credential = form.get("credential", "").strip()
    client = client_address(request.scope)
    try:  # too many failed sign-ins: only a tenant key known valid gets in (auth.py)
        refuse_if_limited(resources, client, credential)
    except Unauthorized as exc:
        wait = exc.retry_after
        page = _sign_in_page(request, resources, f"Too many failures: wait {wait}s.", 429)
        page.headers["retry-after"] = str(wait)
        return page
    viewer = await _viewer_of(resources, credential)
    if isinstance(viewer, str):
        failed(resources, client)
        return _sign_in_page(request, resources, viewer, 401)
    session_id = keys.new_session_id()
    expires = datetime.now(UTC) + timedelta(seconds=keys.max_age)
    async with resources.database().acquire() as connection:
        await reads.open_session(
            connection,
            keys.digest(session_id),
            viewer,
            expires,
            admin_fingerprint(resources) if viewer.role == "operator" else None,
        )
    response = RedirectResponse(PATH, 303, headers={"cache-control": "no-store"})
    site = site_of(request, resources)
    _cookie(response, site, SESSION_COOKIE, keys.cookie(session_id), keys.max_age)
    response.delete_cookie(CSRF_COOKIE, path=PATH)
    return response


async def _viewer_of(resources: Resources, credential: str) -> Viewer | str:
    """Who ``credential`` signs in as, or why it cannot (a message for the form)."""
    if not credential:
        return "Enter a tenant API key or the admin token."
    if _is_admin_token(resources, credential):
        return Viewer("operator")
    try:
        key = await tenant_of(resources, credential)
    except Unauthorized as exc:
        if exc.status == 503:
            return "Keys cannot be checked: the gateway has no database."
        return "That key is unknown or revoked."
    return Viewer("tenant", key.tenant_id, key.key_id)


def _is_admin_token(resources: Resources, credential: str) -> bool:
    token = resources.settings.admin_token
    return token is not None and same_secret(credential, token)


@router.post("/sign-out")
async def sign_out(request: Request, resources: Deps) -> Response:
    """End the session (every gateway process refuses its cookie from now on)."""
    form = await _form(request, resources)
    signed = await signed_in(request, resources)
    response = RedirectResponse(PATH, 303, headers={"cache-control": "no-store"})
    if signed is not None:
        if not resources.dashboard.keys.csrf_matches(signed.session_id, form.get("csrf", "")):
            raise HTTPException(403, "the sign-out form is not this session's")
        async with resources.database().acquire() as connection:
            await reads.end_session(connection, SessionKeys.digest(signed.session_id))
        forget_session(resources, signed.session_id)
    response.delete_cookie(SESSION_COOKIE, path=PATH)
    return response


@router.get("/invoices/{number}")
async def invoice_download(
    request: Request, resources: Deps, signed: Session, number: str, tenant_id: str | None = None
) -> Response:
    """One of the tenant's invoices (``.json``, ``.html`` or ``.pdf``)."""
    tenant = tenant_in_view(signed, tenant_id)
    response = await invoice_response(request, resources, tenant, number)
    response.headers.update(DOWNLOAD_HEADERS)
    return response
