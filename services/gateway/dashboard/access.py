"""Who is asking the dashboard: the session behind a request's cookie, and which tenant it
may read.

A tenant's session reads its own tenant only: another tenant's id, request or invoice is 404,
exactly as one that does not exist. An operator's session lasts while the admin token it
signed in with is still the gateway's (a new token ends it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from services.adapters import dashboard as reads
from services.adapters.dashboard import Viewer
from services.gateway.dashboard.session import SESSION_COOKIE, SessionKeys
from services.gateway.resources import Deps, Resources

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",  # not no-referrer: Chromium then sends "Origin: null"
    "cache-control": "no-store",
}
"""On every dashboard answer: scripts, styles and data from the gateway only, no framing,
nothing cached."""
DOWNLOAD_HEADERS = {
    **SECURITY_HEADERS,
    # an invoice's HTML is one self-contained page: its own inline styles, nothing else
    "content-security-policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"
    ),
}
"""On invoice downloads."""


@dataclass(frozen=True, slots=True)
class Signed:
    """A live session: who it is, and its id (for its sign-out form's CSRF token)."""

    viewer: Viewer
    session_id: str


def site_of(request: Request, resources: Resources) -> str:
    """This dashboard's origin as the browser sees it: ``BILLING_PUBLIC_URL`` (behind a
    proxy), else the request's own scheme and host."""
    public = resources.settings.public_url
    return public or f"{request.url.scheme}://{request.headers.get('host', '')}"


def admin_fingerprint(resources: Resources) -> bytes | None:
    """What an operator session keeps of the admin token it signed in with."""
    token = resources.settings.admin_token
    return None if token is None else SessionKeys.digest(token.get_secret_value())


async def signed_in(request: Request, resources: Resources) -> Signed | None:
    """The live session of the request's cookie, or ``None``. The answer is reused for
    ``SESSION_SECONDS`` in this process (a page polls several routes at once): a session
    ended in another gateway process is refused here within that time."""
    keys = resources.dashboard.keys
    session_id = keys.session_id(request.cookies.get(SESSION_COOKIE))
    if session_id is None or resources.pool is None:
        return None
    digest, fingerprint = SessionKeys.digest(session_id), admin_fingerprint(resources)
    pool = resources.pool

    async def read() -> Viewer | None:
        async with pool.acquire() as connection:
            return await reads.live_session(connection, digest, fingerprint)

    viewer = await resources.dashboard.sessions.get((digest, fingerprint), read)
    return None if viewer is None else Signed(viewer, session_id)


def forget_session(resources: Resources, session_id: str) -> None:
    """Drop this process's cached answer for a session (it was just ended)."""
    resources.dashboard.sessions.forget(
        (SessionKeys.digest(session_id), admin_fingerprint(resources))
    )


async def _session(request: Request, resources: Deps) -> Signed:
    signed = await signed_in(request, resources)
    if signed is None:
        raise HTTPException(401, "not signed in (sign in at /dashboard)")
    return signed


Session = Annotated[Signed, Depends(_session)]


async def require_operator(signed: Session) -> Signed:
    """An operator's session; a tenant's is told the route does not exist."""
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
