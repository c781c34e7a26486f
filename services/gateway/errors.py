"""How the gateway answers errors: one JSON shape everywhere, the SDKs' shape on the proxies.

Billing and admin routes answer ``{"error": message}`` (plus ``field`` where one input is at
fault, as the quote errors and the CLI do); the proxy routes answer the shape both LLM SDK
families read (``proxy.error``). Every status FastAPI or Starlette raises on its own — 404
for an unknown path, 405 for a wrong method, 422 for a bad query parameter — takes the same
shapes, and an unexpected exception is a logged 500, never a traceback to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from services.core.errors import BillingError, PriceNotFound
from services.core.quote import error_json
from services.gateway import proxy
from services.gateway.responses import ORJSONResponse

log = logging.getLogger("billing.gateway")


async def billing_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, BillingError)  # noqa: S101  # registered for BillingError only
    status = 404 if isinstance(exc, PriceNotFound) else 422
    return ORJSONResponse(error_json(exc), status_code=status)


async def invalid_request(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)  # noqa: S101
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = ".".join(str(p) for p in first["loc"] if p not in ("query", "body", "path"))
    message = "is required" if first.get("type") == "missing" else first["msg"]
    return ORJSONResponse({"error": message, "field": field}, status_code=422)


def sdk_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """A FastAPI route's error in the shape of the proxies' (``proxy.error_body``)."""
    body = proxy.error_body(status, message)
    return Response(body, status, headers, media_type="application/json")


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)  # noqa: S101
    if request.url.path.startswith(proxy.PROXY_PATHS):
        return sdk_error(exc.status_code, str(exc.detail), exc.headers)
    detail = exc.detail
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        detail = f"{request.method} is not allowed on {request.url.path}" + (
            f" (use {allowed})" if allowed else ""
        )
    elif exc.status_code == 404 and detail == "Not Found":
        detail = f"no such route: {request.url.path}"
    return ORJSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)


async def client_gone(request: Request, _: Exception) -> Response:
    # The client left while sending its request: nothing was forwarded, nothing billed,
    # and nobody is there to read an answer.
    log.info("client left during its request to %s", request.url.path)
    return Response(status_code=499)


async def internal_error(request: Request, _: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return ORJSONResponse({"error": "internal error"}, status_code=500)


def install(app: FastAPI) -> None:
    """Register every handler above on ``app``."""
    app.add_exception_handler(BillingError, billing_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    # Starlette's own class: its router raises it for 404 and 405 (FastAPI's subclasses it).
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, internal_error)
