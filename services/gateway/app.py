"""The gateway application: ``create_app`` wires settings, the price book and the routes."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import httpx
import orjson
from aiokafka.errors import KafkaError
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from services.adapters.database import create_pool
from services.adapters.kafka import make_producer
from services.adapters.pricing_cache import PricingCache
from services.adapters.settings import Settings
from services.adapters.topics import Topics
from services.adapters.wiring import pricing_cache
from services.core.errors import BillingError, PriceNotFound
from services.core.quote import error_json, quote
from services.gateway import gemini, ingest, models, prices_api, proxy, queries, tokens
from services.gateway.auth import KeyCache, require_admin
from services.gateway.emitter import Emitter
from services.gateway.spool import Spool

log = logging.getLogger("billing.gateway")


class ORJSONResponse(JSONResponse):
    """JSON rendered by orjson (every body here is str/int/bool/None: money is already text)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def create_app(
    settings: Settings | None = None,
    cache: PricingCache | None = None,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """The gateway; ``upstream_transport`` replaces the network to the LLM upstreams
    (OpenRouter and Gemini/Vertex alike: tests)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.prices = cache or pricing_cache(settings)
        app.state.prices.poke()  # first catalogue refresh starts in the background
        app.state.pool = None
        if settings.database_url:
            app.state.pool = await create_pool(settings.database_url)
        app.state.producer = None
        app.state.broker_configured = bool(settings.kafka_bootstrap)
        app.state.publish_timeout = settings.publish_timeout_seconds
        app.state.topics = Topics.named(settings.topic_prefix)
        # One pooled connection per request in flight: past the default keep-alive limit
        # (20) every extra response would close its connection and the next open a new one.
        limits = httpx.Limits(
            max_connections=settings.max_in_flight,
            max_keepalive_connections=settings.max_in_flight,
        )
        timeout = httpx.Timeout(settings.upstream_timeout_seconds, connect=5.0)
        app.state.in_flight = proxy.InFlight(settings.max_in_flight)
        app.state.upstream = httpx.AsyncClient(
            base_url=settings.openrouter_base_url,
            timeout=timeout,
            limits=limits,
            transport=upstream_transport,
        )
        key = settings.openrouter_api_key
        app.state.upstream_headers = {"content-type": "application/json"} | (
            {"authorization": f"Bearer {key.get_secret_value()}"} if key else {}
        )
        app.state.gemini_upstream = httpx.AsyncClient(
            timeout=timeout, limits=limits, transport=upstream_transport
        )
        app.state.gemini_target = gemini.gemini_target(settings)
        app.state.emit_usage = settings.emit_usage
        app.state.emitter = Emitter(
            lambda: app.state.producer,
            app.state.topics.usage,
            Spool(settings.usage_spool_dir),
            spool_max_bytes=settings.spool_max_bytes,
            reject_when_full=settings.spool_full_policy == "reject",
        )
        await app.state.emitter.start()
        # Tokenizers for estimated usage load in the background (about half a second).
        warming = asyncio.create_task(asyncio.to_thread(_warm_tokenizers))
        connecting = None
        if settings.kafka_bootstrap:
            connecting = asyncio.create_task(_connect_producer(app, settings.kafka_bootstrap))
        try:
            yield
        finally:
            await app.state.emitter.close()
            await warming
            await app.state.upstream.aclose()
            await app.state.gemini_upstream.aclose()
            if connecting is not None:
                connecting.cancel()
            if app.state.producer is not None:
                await app.state.producer.stop()
            if app.state.pool is not None:
                await app.state.pool.close()

    app = FastAPI(
        title="LLM billing gateway",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
    )
    token = settings.admin_token
    app.state.admin_token = token.get_secret_value() if token else None
    app.state.key_cache = KeyCache()

    # Every error answers {"error": ...}, like the quote errors and the CLI.
    @app.exception_handler(BillingError)
    async def billing_error(_: Request, exc: BillingError) -> ORJSONResponse:
        status = 404 if isinstance(exc, PriceNotFound) else 422
        return ORJSONResponse(error_json(exc), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> ORJSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first["loc"] if p not in ("query", "body", "path"))
        return ORJSONResponse({"error": first["msg"], "field": field}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith(proxy.PROXY_PATHS):
            return proxy.error(exc.status_code, str(exc.detail), exc.headers)
        return ORJSONResponse(
            {"error": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _: ClientDisconnect) -> Response:
        # The client left while sending its request: nothing was forwarded, nothing billed,
        # and nobody is there to read an answer.
        log.info("client left during its request to %s", request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, _: Exception) -> ORJSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return ORJSONResponse({"error": "internal error"}, status_code=500)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> ORJSONResponse:
        state = request.app.state
        checks = {
            "broker": "ok" if state.producer is not None else "unavailable",
            "database": "ok" if state.pool is not None else "not configured",
        }
        if not settings.kafka_bootstrap:
            checks["broker"] = "not configured"
        ready = checks["broker"] != "unavailable"
        body = {"status": "ok" if ready else "starting", **checks, "prices": state.prices.status()}
        return ORJSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        request.app.state.emitter.observe()
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/internal/billing/quote", dependencies=[Depends(require_admin)])
    async def quote_route(request: Request) -> ORJSONResponse:
        """Price a model, and optionally one request's usage (see README for the shape)."""
        try:
            body = json.loads(await request.body(), parse_float=Decimal)
        except (ValueError, RecursionError) as exc:
            return ORJSONResponse({"error": f"body is not valid JSON: {exc}"}, status_code=400)
        return ORJSONResponse(quote(body, request.app.state.prices))

    app.include_router(queries.router)
    app.include_router(queries.tenant_router)
    app.include_router(ingest.router)
    app.include_router(proxy.router)
    app.include_router(gemini.router)
    app.include_router(models.router)
    app.include_router(prices_api.router)
    return app


async def _connect_producer(app: FastAPI, bootstrap: str) -> None:
    """Start the Kafka producer, retrying: the gateway serves quotes while the broker is away."""
    delay = 0.5
    while True:
        producer = make_producer(bootstrap)
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            log.warning("broker %s unavailable (%r); retrying in %.1fs", bootstrap, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            continue
        app.state.producer = producer
        log.info("connected to broker %s", bootstrap)
        return


def _warm_tokenizers() -> None:
    try:
        tokens.warm()
    except Exception:  # estimates will fail (and say so) per request; serving goes on
        log.exception("tokenizers for estimated usage could not be loaded")
