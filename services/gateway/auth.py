"""Authentication: the admin and finance tokens for ``/internal``, tenant API keys for the
public routes, and the limit on failed attempts per client address.

The admin token reads and writes everything; the finance token may only read
(:data:`FINANCE_READS`) and is refused elsewhere with 403. Tokens are compared in constant
time. A client address that fails to authenticate ``auth_failures_per_minute`` times is
answered 429 (``Retry-After``) on its next attempts until its allowance refills — but for
a key this process has already found valid (cached): nothing is looked up for it meanwhile.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
from collections.abc import Mapping
from typing import Any

from fastapi import HTTPException, Request, status
from pydantic import SecretStr

from services.adapters.tenants import key_hash
from services.gateway.keys import TenantKey
from services.gateway.resources import Resources, resources_of

FINANCE_READS = (
    "/internal/billing/summary",
    "/internal/billing/transactions",
    "/internal/billing/drift",
    "/internal/billing/invoices",
)
"""What the finance token may read (``GET``, these paths and the paths below them)."""


async def require_admin(request: Request) -> None:
    """Allow the request when no admin token is configured, the Bearer token is the admin
    token, or it is the finance token on a read of :data:`FINANCE_READS` (403 elsewhere);
    401 otherwise, 429 after too many failures from this address (a coroutine, though it
    awaits nothing: FastAPI runs a plain function in a thread)."""
    resources = resources_of(request)
    settings = resources.settings
    if settings.admin_token is None:
        return
    # The limit first, for the right token too: tokens may be short, and a 429 for wrong
    # guesses only would tell a guesser which one was right. (Tenant keys are ours, 256
    # random bits: a key known valid passes a limited address, ``refuse_if_limited``.)
    client = client_address(request.scope)
    try:
        refuse_if_limited(resources, client)
    except Unauthorized as exc:
        raise HTTPException(exc.status, exc.message, headers=exc.headers) from None
    supplied = bearer(request.headers)
    if same_secret(supplied, settings.admin_token):
        return
    if settings.finance_token is not None and same_secret(supplied, settings.finance_token):
        if finance_may(request.method, request.url.path):
            return
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "the finance token may only read /internal/billing/summary, transactions, "
            "drift and invoices",
        )
    failed(resources, client)
    raise HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="a valid admin token is required (Authorization: Bearer ...)",
        headers={"WWW-Authenticate": "Bearer"},
    )


def finance_may(method: str, path: str) -> bool:
    """Whether the finance token may make this request (a read of :data:`FINANCE_READS`)."""
    if method not in ("GET", "HEAD"):
        return False
    path = path.rstrip("/")
    return any(path == allowed or path.startswith(allowed + "/") for allowed in FINANCE_READS)


def same_secret(supplied: str, expected: SecretStr) -> bool:
    """Whether ``supplied`` is the secret (constant time; a blank secret matches nothing)."""
    # A blank token (an empty environment variable) matches nothing, not a missing header.
    secret = expected.get_secret_value().strip()
    # Compare bytes: compare_digest refuses non-ASCII str, and a header is the client's to send.
    return bool(secret) and hmac.compare_digest(supplied.encode(), secret.encode())


def client_address(scope: Mapping[str, Any]) -> str:
    """The client's address of an ASGI scope (uvicorn puts the forwarded one there when
    the proxy in front is trusted: ``--forwarded-allow-ips``)."""
    client = scope.get("client")
    if not client:
        return "unknown"
    address = str(client[0])
    if ":" in address:  # IPv6: one holder has a whole /64, so it counts as one address
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return address


def limited_for(resources: Resources, client: str) -> int | None:
    """Seconds ``client`` must wait after failing too often lately, or ``None``."""
    limit = resources.settings.auth_failures_per_minute
    return resources.key_cache.failures.retry_after(client, limit)


def failed(resources: Resources, client: str) -> None:
    """Count one failed authentication by ``client``."""
    resources.key_cache.failures.failed(client, resources.settings.auth_failures_per_minute)


def refuse_if_limited(resources: Resources, client: str, key: str = "") -> None:
    """:class:`Unauthorized` (429, ``Retry-After``) when ``client`` failed too often lately,
    unless ``key`` is one this process already knows to be valid: behind a proxy that does
    not forward addresses, one client guessing keys must not lock out everyone else."""
    wait = limited_for(resources, client)
    if wait is None or (key and _known_valid(resources, key)):
        return
    raise Unauthorized(
        f"too many failed authentications from this address; retry in {wait}s",
        429,
        retry_after=wait,
    )


def _known_valid(resources: Resources, key: str) -> bool:
    hit, found = resources.key_cache.get(key_hash(key))
    return hit and found is not None


def count_failure(resources: Resources, client: str, exc: Unauthorized) -> None:
    """Count ``exc`` against ``client`` when it is a refused credential (401)."""
    if exc.status == 401:
        failed(resources, client)


class Unauthorized(Exception):
    """The request carries no usable credentials (401), its address failed too often (429),
    or keys cannot be checked (503)."""

    def __init__(self, message: str, status: int = 401, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str] | None:
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        if self.retry_after is not None:
            return {"Retry-After": str(self.retry_after)}
        return None


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
    """The tenant and key behind ``Authorization: Bearer <key>``; 401 otherwise, 429 after
    too many failures from this address."""
    resources, client = resources_of(request), client_address(request.scope)
    try:
        key = bearer(request.headers)
        refuse_if_limited(resources, client, key)
        return await tenant_of(resources, key)
    except Unauthorized as exc:
        count_failure(resources, client, exc)
        raise HTTPException(exc.status, exc.message, headers=exc.headers) from None
