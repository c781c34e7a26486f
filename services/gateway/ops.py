"""Operations routes: liveness, readiness, Prometheus metrics, and the admin quote."""

from __future__ import annotations

import json
import os
from decimal import Decimal
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from services.core.quote import quote
from services.gateway.auth import require_admin
from services.gateway.resources import Deps
from services.gateway.responses import ORJSONResponse

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, Any]:
    """The process is up (``pid``: which worker answered)."""
    return {"status": "ok", "pid": os.getpid()}


@router.get("/readyz")
async def readyz(resources: Deps) -> ORJSONResponse:
    """503 while a configured broker has not been reached; the price book's status."""
    checks = {
        "broker": "ok" if resources.publisher is not None else "unavailable",
        "database": "ok" if resources.pool is not None else "not configured",
    }
    if not resources.broker_configured:
        checks["broker"] = "not configured"
    ready = checks["broker"] != "unavailable"
    body = {
        "status": "ok" if ready else "starting",
        **checks,
        "prices": resources.prices.status(),
    }
    return ORJSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics_route(resources: Deps) -> Response:
    """Prometheus text format."""
    resources.emitter.observe()
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
    # Several workers: counters and histograms summed over all of them, gauges per pid.
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/internal/billing/quote", dependencies=[Depends(require_admin)])
async def quote_route(request: Request, resources: Deps) -> ORJSONResponse:
    """Price a model, and optionally one request's usage (see README for the shape)."""
    try:
        body = json.loads(await request.body(), parse_float=Decimal)
    except (ValueError, RecursionError) as exc:
        return ORJSONResponse({"error": f"body is not valid JSON: {exc}"}, status_code=400)
    return ORJSONResponse(quote(body, resources.prices))
