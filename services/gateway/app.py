"""The gateway application: ``create_app`` wires settings, the price book and the routes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from services.core.errors import BillingError, PriceNotFound
from services.core.quote import error_json, quote
from services.gateway.auth import require_admin
from services.runtime.pricebook_file import FilePriceBook
from services.runtime.pricing_cache import OpenRouterCatalogue, PricingCache
from services.runtime.settings import Settings


def build_pricing_cache(settings: Settings) -> PricingCache:
    """The price book on disk, refreshed from OpenRouter when ``catalogue_sync`` is on."""
    book = FilePriceBook.open(settings.price_book_path)
    source = None
    if settings.catalogue_sync:
        key = settings.openrouter_api_key
        source = OpenRouterCatalogue(
            settings.openrouter_base_url,
            key.get_secret_value() if key else None,
            timeout=settings.catalogue_timeout_seconds,
        )
    return PricingCache(
        book, source, ttl=settings.price_ttl_seconds, retry_after=settings.catalogue_retry_seconds
    )


def create_app(settings: Settings | None = None, cache: PricingCache | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.prices = cache or build_pricing_cache(settings)
        app.state.prices.poke()  # first catalogue refresh starts in the background
        yield

    app = FastAPI(title="LLM billing gateway", version="0.1.0", lifespan=lifespan)
    token = settings.admin_token
    app.state.admin_token = token.get_secret_value() if token else None

    @app.exception_handler(BillingError)
    async def billing_error(_: Request, exc: BillingError) -> JSONResponse:
        status = 404 if isinstance(exc, PriceNotFound) else 422
        return JSONResponse(error_json(exc), status_code=status)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> dict[str, Any]:
        return {"status": "ok", "prices": request.app.state.prices.status()}

    @app.post("/internal/billing/quote", dependencies=[Depends(require_admin)])
    async def quote_route(request: Request) -> JSONResponse:
        """Price a model, and optionally one request's usage (see README for the shape)."""
        try:
            body = json.loads(await request.body(), parse_float=Decimal)
        except ValueError as exc:
            return JSONResponse({"error": f"body is not valid JSON: {exc}"}, status_code=400)
        return JSONResponse(quote(body, request.app.state.prices))

    return app
