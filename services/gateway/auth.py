"""Admin-token authentication for the ``/internal`` API."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, status


def require_admin(request: Request) -> None:
    """Allow the request when no admin token is configured or the Bearer token matches."""
    expected: str | None = request.app.state.admin_token
    if expected is None:
        return
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
