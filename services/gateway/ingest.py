"""POST /v1/usage: record usage reported by other gateways, acknowledged by the broker.

Each item becomes a ``UsageRecorded`` on ``billing.usage.v1`` (key ``tenant_id``). The answer
is 202 only once the broker has acknowledged every accepted item (acks=all). Invalid items
get their own error while the valid ones go through. If the broker cannot be reached the
whole request answers 503 with ``Retry-After``: some items may have reached the log, but a
retry is safe because every consumer deduplicates on ``request_id``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import ValidationError

from services.adapters import metrics
from services.adapters.errors import DatabaseError, PublishError
from services.adapters.tenants import valid_tenant_id
from services.core.errors import BillingError, FieldError
from services.core.events import ReportedCharge, UsageCounts, UsageRecorded
from services.core.money import to_decimal
from services.core.quote import parse_time
from services.core.usage import ReportedCost, parse_usage
from services.gateway.auth import require_admin
from services.gateway.resources import Deps, Resources
from services.gateway.responses import ORJSONResponse

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


REQUIRED = ("request_id", "tenant_id", "provider", "provider_model_id", "usage")


class ItemError(FieldError):
    """An ingest item that cannot be recorded."""


def to_event(item: object, now: datetime) -> UsageRecorded:
    """Validate one ingest item into the fact it records; raises ``BillingError``."""
    if not isinstance(item, Mapping):
        raise ItemError("item", "must be a JSON object")
    unknown = sorted(str(k) for k in item if k not in ITEM_FIELDS)
    if unknown:
        raise ItemError(unknown[0], "is not a field of a usage record")
    for name in REQUIRED:
        if item.get(name) is None:
            raise ItemError(name, "is required")
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


@router.post("/v1/usage", status_code=202)
async def ingest(request: Request, resources: Deps) -> Any:
    """Record one usage item or a batch (a JSON array of at most 1,000)."""
    publisher = resources.publisher
    if publisher is None:
        if not resources.broker_configured:
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
    accepted: list[tuple[int, UsageRecorded]] = []
    for index, item in enumerate(items):
        try:
            accepted.append((index, to_event(item, now)))
        except BillingError as exc:
            results.append(_rejected(index, exc))
        except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
            # A rule that should have named the field did not: this item only is refused.
            log.exception("unreadable usage item %d", index)
            results.append(_rejected(index, ItemError("item", f"cannot be read ({exc!r:.80})")))
    unknown = await _unknown_tenants(resources, {e.tenant_id for _, e in accepted})
    events: list[UsageRecorded] = []
    for index, event in accepted:
        if event.tenant_id in unknown:
            results.append(_rejected(index, _no_tenant(event.tenant_id, resources)))
            continue
        events.append(event)
        results.append({"index": index, "status": "accepted", "request_id": event.request_id})
    results.sort(key=lambda r: r["index"])
    metrics.INGEST_REJECTED.inc(len(items) - len(events))
    if events:
        try:
            await publisher.publish(
                resources.topics.usage, events, resources.settings.publish_timeout_seconds
            )
        except PublishError as exc:
            log.warning("broker unavailable, refusing %d items: %r", len(events), exc)
            raise HTTPException(
                503,
                "the broker did not acknowledge the usage; retrying is safe (dedup by request_id)",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from exc
        metrics.INGESTED.inc(len(events))
    answer: dict[str, Any] = {"accepted": len(events), "rejected": len(items) - len(events)}
    if items and not events:  # a 422: said in the error shape of every other route too
        answer["error"] = f"no item was accepted ({len(items)} rejected: see results)"
    status = 202 if events or not items else 422
    return ORJSONResponse(answer | {"results": results}, status_code=status)


def _rejected(index: int, exc: BillingError) -> dict[str, Any]:
    field = exc.field if isinstance(exc, FieldError) else None
    return {"index": index, "status": "rejected", "error": str(exc), "field": field}


async def _unknown_tenants(resources: Resources, tenant_ids: set[str]) -> set[str]:
    """The tenants whose usage is refused: none when there is no database (usage is taken
    as reported); else ids no tenant can have, and, unless unknown tenants are created
    (``BILLING_UNKNOWN_TENANTS``), ids that are not tenants."""
    store = resources.tenants
    if store is None or not tenant_ids:
        return set()
    create = resources.settings.unknown_tenants == "create"
    invalid = {t for t in tenant_ids if not valid_tenant_id(t)}  # never a tenant: refused
    try:
        unknown = await store.unknown(tenant_ids - invalid, create=create)
    except DatabaseError as exc:
        if create:  # the usage matters more than the tenant row: take it, create it later
            log.warning("tenants not checked (%s); taking the usage as reported", exc)
            return invalid
        raise HTTPException(
            503, "tenants cannot be checked now; retry later", {"Retry-After": "5"}
        ) from exc
    if not create:
        return unknown | invalid
    if unknown:
        metrics.TENANTS_CREATED.inc(len(unknown))
        log.info("created tenants %s for the usage reported for them", sorted(unknown))
    return invalid


def _no_tenant(tenant_id: str, resources: Resources) -> ItemError:
    if not valid_tenant_id(tenant_id):
        return ItemError(
            "tenant_id",
            f"{tenant_id!r:.80} cannot be a tenant id (1-63 of a-z 0-9 . _ -, lower case)",
        )
    hint = "create it with `billing tenants create`"
    if resources.settings.unknown_tenants == "reject":
        hint += ", or set BILLING_UNKNOWN_TENANTS=create"
    return ItemError("tenant_id", f"no tenant {tenant_id!r} ({hint})")
