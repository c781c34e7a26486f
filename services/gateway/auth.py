"""Authentication: the admin token for ``/internal``, tenant API keys for the public routes."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from fastapi import HTTPException, Request, status

from services.adapters.tenants import key_hash
from services.gateway.keys import TenantKey
from services.gateway.resources import Resources, resources_of


async def require_admin(request: Request) -> None:
    """Allow the request when no admin token is configured or the Bearer token matches (a
    coroutine, though it awaits nothing: FastAPI runs a plain function in a thread)."""
    token = resources_of(request).settings.admin_token
    if token is None:
        return
    expected = token.get_secret_value()
    header = request.headers.get("authorization", "")
    scheme, _, supplied = header.partition(" ")
    # Compare bytes: compare_digest refuses non-ASCII str, and a header is the client's to send.
    matches = hmac.compare_digest(supplied.strip().encode(), expected.encode())
    if scheme.lower() != "bearer" or not matches:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="a valid admin token is required (Authorization: Bearer ...)",
            headers={"WWW-Authenticate": "Bearer"},
        )


class Unauthorized(Exception):
    """The request carries no usable credentials (401), or keys cannot be checked (503)."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": "Bearer"} if self.status == 401 else None


def bearer(headers: Mapping[str, str]) -> str:
    """The key of ``Authorization: Bearer <key>`` (names lower-case), or ``""``."""
    scheme, _, key = headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def gemini_key(headers: Mapping[str, str]) -> str:
    """The Bearer key, else ``x-goog-api-key`` (where Google's Gemini SDKs put it). A
    ``?key=`` query parameter is not accepted: URLs end up in access logs."""
    return bearer(headers) or headers.get("x-goog-api-key", "").strip()


async def tenant_of(resources: Resources, key: str, *, gemini: bool = False) -> TenantKey:
    """The tenant and key behind ``key`` (cached for a few seconds); :class:`Unauthorized`
    when there is none (``gemini``: the message names Google's header too)."""
    if not key:
        where = "Authorization: Bearer ..." + (" or x-goog-api-key" if gemini else "")
        raise Unauthorized(f"an API key is required ({where})")
    cache = resources.key_cache
    digest = key_hash(key)
    hit, found = cache.get(digest)
    if not hit:
        if resources.tenants is None:
            raise Unauthorized("no database is configured for API keys", 503)
        match = await resources.tenants.authenticate(key)
        found = TenantKey(*match) if match else None
        cache.put(digest, found)
    if found is None:
        raise Unauthorized("unknown or revoked API key")
    return found


async def require_tenant(request: Request) -> TenantKey:
    """The tenant and key behind ``Authorization: Bearer <key>``; 401 otherwise."""
    try:
        return await tenant_of(resources_of(request), bearer(request.headers))
    except Unauthorized as exc:
        raise HTTPException(exc.status, exc.message, headers=exc.headers) from None
