"""The gateway application: ``create_app`` opens the resources and mounts the routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig

from services.adapters.pricing_cache import PricingCache
from services.adapters.publisher import EventPublisher
from services.adapters.settings import Settings
from services.gateway import (
    credits_api,
    errors,
    front,
    ingest,
    invoices_api,
    limits,
    models,
    openapi,
    ops,
    prices_api,
    queries,
    quota_api,
)
from services.gateway.dashboard import api as dashboard_api
from services.gateway.dashboard import pages as dashboard_pages
from services.gateway.resources import Resources
from services.gateway.responses import ORJSONResponse

ROUTERS = (
    ops.router,
    queries.router,
    queries.tenant_router,
    ingest.router,
    models.router,
    prices_api.router,
    credits_api.router,
    quota_api.router,
    quota_api.tenant_router,
    invoices_api.tenant_router,
    invoices_api.admin_router,
    dashboard_pages.router,
    dashboard_api.router,
)


_NO_TELEMETRY: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
}


class Gateway(FastAPI):
    """FastAPI, with the proxy routes answered before any of its own machinery (front.py)."""

    body_limit: int = 16 << 20
    """``max_body_bytes`` and ``body_timeout_seconds`` (set by :func:`create_app`)."""
    body_seconds: float = 30.0

    async def __call__(self, scope: front.Scope, receive: front.Receive, send: front.Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        # Every request's body is bounded (limits.py): a declared one too large is refused
        # unread, the others are counted and timed as they are read.
        refused = limits.refusal(scope["headers"], self.body_limit)
        if refused is not None:
            await limits.send_refusal(scope["path"], refused, send)
            return
        receive = limits.Body(receive, self.body_limit, self.body_seconds)
        route = front.route_of(scope)
        if route is None:
            await super().__call__(scope, receive, send)
        else:
            await front.serve(route, self.state.resources, scope, receive, send)


def create_app(
    settings: Settings | None = None,
    cache: PricingCache | None = None,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    publisher: EventPublisher | None = None,
) -> Gateway:
    """The gateway. Tests replace the price cache, the network to the LLM upstreams
    (``upstream_transport``, OpenRouter and Gemini/Vertex alike) or the broker."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Resources.open(settings, cache, upstream_transport, publisher) as resources:
            app.state.resources = resources
            yield

    app = Gateway(
        title="LLM billing gateway",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
        # FastAPI's own OpenTelemetry hooks, off: the gateway reports through its Prometheus
        # metrics, and asking for a configured provider on every request was ~3% of the
        # proxy's CPU at 1,000 req/s (py-spy).
        telemetry=_NO_TELEMETRY,
    )
    app.body_limit = settings.max_body_bytes
    app.body_seconds = settings.body_timeout_seconds
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    app.mount("/dashboard/static", dashboard_pages.static_files(), name="dashboard-static")
    _document(app)
    return app


def _document(app: FastAPI) -> None:
    generate = app.openapi

    def documented() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi.document(generate())
        return app.openapi_schema

    app.openapi = documented  # type: ignore[method-assign]
