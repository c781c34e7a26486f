"""The gateway application: ``create_app`` opens the resources and mounts the routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig

from services.adapters.pricing_cache import PricingCache
from services.adapters.publisher import EventPublisher
from services.adapters.settings import Settings
from services.gateway import errors, gemini, ingest, models, ops, prices_api, proxy, queries
from services.gateway.resources import Resources
from services.gateway.responses import ORJSONResponse

ROUTERS = (
    ops.router,
    queries.router,
    queries.tenant_router,
    ingest.router,
    proxy.router,
    gemini.router,
    models.router,
    prices_api.router,
)


_NO_TELEMETRY: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
}


def create_app(
    settings: Settings | None = None,
    cache: PricingCache | None = None,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    publisher: EventPublisher | None = None,
) -> FastAPI:
    """The gateway. Tests replace the price cache, the network to the LLM upstreams
    (``upstream_transport``, OpenRouter and Gemini/Vertex alike) or the broker."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Resources.open(settings, cache, upstream_transport, publisher) as resources:
            app.state.resources = resources
            yield

    app = FastAPI(
        title="LLM billing gateway",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
        # FastAPI's own OpenTelemetry hooks, off: the gateway reports through its Prometheus
        # metrics, and asking for a configured provider on every request was ~3% of the
        # proxy's CPU at 1,000 req/s (py-spy).
        telemetry=_NO_TELEMETRY,
    )
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
