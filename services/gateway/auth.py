"""Authentication: the admin token for ``/internal``, tenant API keys for the public routes."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, status

from services.adapters.tenants import key_hash
from services.gateway.keys import TenantKey
from services.gateway.resources import resources_of


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


async def require_tenant(request: Request) -> TenantKey:
    """The tenant and key behind ``Authorization: Bearer <key>``; 401 otherwise."""
    key = _bearer(request)
    if not key:
        raise _unauthorized("an API key is required (Authorization: Bearer ...)")
    return await _tenant_of(request, key)


async def require_gemini_tenant(request: Request) -> TenantKey:
    """Like :func:`require_tenant`, also taking the key from ``x-goog-api-key`` (where
    Google's Gemini SDKs put it). A ``?key=`` query parameter is not accepted: URLs end up
    in access logs."""
    key = _bearer(request) or request.headers.get("x-goog-api-key", "").strip()
    if not key:
        raise _unauthorized("an API key is required (Authorization: Bearer ... or x-goog-api-key)")
    return await _tenant_of(request, key)


def _bearer(request: Request) -> str:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


async def _tenant_of(request: Request, key: str) -> TenantKey:
    resources = resources_of(request)
    cache = resources.key_cache
    digest = key_hash(key)
    hit, found = cache.get(digest)
    if not hit:
        if resources.tenants is None:
            raise HTTPException(503, "no database is configured for API keys")
        match = await resources.tenants.authenticate(key)
        found = TenantKey(*match) if match else None
        cache.put(digest, found)
    if found is None:
        raise _unauthorized("unknown or revoked API key")
    return found


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"}
    )
