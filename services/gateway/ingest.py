"""POST /v1/usage: record usage reported by other gateways, acknowledged by the broker.

Each item becomes a ``UsageRecorded`` on ``billing.usage.v1`` (key ``tenant_id``). The answer
is 202 only once the broker has acknowledged every accepted item (acks=all). Invalid items
get their own error while the valid ones go through. If the broker cannot be reached the
whole request answers 503 with ``Retry-After``: some items may have reached the log, but a
retry is safe because every consumer deduplicates on ``request_id``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from services.adapters import metrics
from services.core.errors import BillingError, FieldError
from services.core.events import ReportedCharge, UsageCounts, UsageRecorded
from services.core.money import to_decimal
from services.core.quote import parse_time
from services.core.usage import ReportedCost, parse_usage
from services.gateway.auth import require_admin

log = logging.getLogger("billing.ingest")
router = APIRouter(dependencies=[Depends(require_admin)])

MAX_BATCH = 1000
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
FUTURE_SLACK = timedelta(hours=1)
"""Clocks drift; a usage record from further in the future is a mistake, not a request."""
RETRY_AFTER_SECONDS = 5
ITEM_FIELDS = {
    "request_id",
    "tenant_id",
    "api_key_id",
    "provider",
    "provider_model_id",
    "occurred_at",
    "usage",
    "format",
    "reported_cost",
    "metadata",
    "usage_source",
}


class ItemError(FieldError):
    """An ingest item that cannot be recorded."""


def to_event(item: object, now: datetime) -> UsageRecorded:
    """Validate one ingest item into the fact it records; raises ``BillingError``."""
    if not isinstance(item, Mapping):
        raise ItemError("item", "must be a JSON object")
    unknown = sorted(str(k) for k in item if k not in ITEM_FIELDS)
    if unknown:
        raise ItemError(unknown[0], "is not a field of a usage record")
    fmt = item.get("format")
    if fmt is not None and not isinstance(fmt, str):
        raise ItemError("format", "must be a string")
    parsed = parse_usage(item.get("usage"), fmt)
    reported = parsed.reported
    if item.get("reported_cost") is not None:
        try:
            cost = to_decimal(item["reported_cost"])
        except ValueError as exc:
            raise ItemError("reported_cost", str(exc)) from None
        reported = ReportedCost(cost=cost)
    occurred = item.get("occurred_at")
    occurred_at = parse_time(occurred, "occurred_at") if occurred is not None else now
    if not EARLIEST <= occurred_at <= now + FUTURE_SLACK:
        raise ItemError("occurred_at", f"{occurred} is outside 2000-01-01 .. now + 1 hour")
    try:
        return UsageRecorded(
            request_id=item.get("request_id"),
            tenant_id=item.get("tenant_id"),
            api_key_id=item.get("api_key_id"),
            provider=item.get("provider"),
            provider_model_id=item.get("provider_model_id"),
            occurred_at=occurred_at,
            recorded_at=now,
            usage=UsageCounts.of(parsed.usage),
            usage_source=item.get("usage_source", "upstream"),
            usage_format=parsed.format,
            reported=ReportedCharge.of(reported),
            metadata=item.get("metadata") or {},
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ItemError(".".join(str(p) for p in first["loc"]), first["msg"]) from None


async def publish(
    producer: AIOKafkaProducer, topic: str, events: list[UsageRecorded], timeout: float
) -> None:
    """Send every event and wait until the broker acknowledged all of them."""
    pending = [
        await producer.send(topic, e.model_dump_json().encode(), key=e.tenant_id.encode())
        for e in events
    ]
    await asyncio.wait_for(asyncio.gather(*pending), timeout)


@router.post("/v1/usage", status_code=202)
async def ingest(request: Request) -> Any:
    """Record one usage item or a batch (a JSON array of at most 1,000)."""
    producer: AIOKafkaProducer | None = getattr(request.app.state, "producer", None)
    if producer is None:
        if not request.app.state.broker_configured:
            raise HTTPException(503, "no broker is configured (set BILLING_KAFKA_BOOTSTRAP)")
        raise HTTPException(
            503,
            "the broker is unreachable; retry later",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    try:
        body = json.loads(await request.body(), parse_float=Decimal)
    except (ValueError, RecursionError) as exc:
        raise HTTPException(400, f"body is not valid JSON: {exc}") from None
    items = body if isinstance(body, list) else [body]
    if len(items) > MAX_BATCH:
        raise HTTPException(413, f"at most {MAX_BATCH} items per request, got {len(items)}")
    now = datetime.now(UTC)
    results: list[dict[str, Any]] = []
    events: list[UsageRecorded] = []
    for index, item in enumerate(items):
        try:
            event = to_event(item, now)
        except BillingError as exc:
            field = exc.field if isinstance(exc, FieldError) else None
            results.append(
                {"index": index, "status": "rejected", "error": str(exc), "field": field}
            )
            continue
        events.append(event)
        results.append({"index": index, "status": "accepted", "request_id": event.request_id})
    metrics.INGEST_REJECTED.inc(len(items) - len(events))
    if events:
        try:
            state = request.app.state
            await publish(producer, state.topics.usage, events, state.publish_timeout)
        except (KafkaError, TimeoutError) as exc:
            log.warning("broker unavailable, refusing %d items: %r", len(events), exc)
            raise HTTPException(
                503,
                "the broker did not acknowledge the usage; retrying is safe (dedup by request_id)",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from exc
        metrics.INGESTED.inc(len(events))
    status = 202 if events or not items else 422
    return JSONResponse(
        {"accepted": len(events), "rejected": len(items) - len(events), "results": results},
        status_code=status,
    )
