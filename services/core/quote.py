"""A quote: the price of a model, and of one request's usage, as a JSON-ready document.

The HTTP route and the CLI both call :func:`quote`; they only decode the request (with
``parse_float=Decimal``) and encode the answer, so both print exactly the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from services.core.cost import compute_cost
from services.core.errors import (
    BillingError,
    FieldError,
    PriceNotFound,
    PricingError,
    QuoteRequestError,
    VariablePricing,
)
from services.core.money import difference, fmt
from services.core.pricebook import PriceLookup
from services.core.pricing import parse_pricing
from services.core.usage import parse_usage


def parse_time(value: object, field: str = "at") -> datetime:
    """Parse an RFC 3339 timestamp that carries its timezone."""
    if not isinstance(value, str):
        raise QuoteRequestError(field, "must be an RFC 3339 timestamp string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise QuoteRequestError(field, f"{value!r} is not an RFC 3339 timestamp") from None
    if parsed.tzinfo is None:
        raise QuoteRequestError(field, f"{value!r} has no timezone (add Z or +00:00)")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise QuoteRequestError(field, f"{value!r} is out of range") from None


def quote(request: Mapping[str, Any], book: PriceLookup) -> dict[str, Any]:
    """Answer one quote request.

    ``{"provider_model_id", "usage"?, "format"?, "pricing"?, "at"?}`` →
    ``{"provider_model_id", "model", "pricing", "price_version", "effective_from",
    "price_source", ["usage", "usage_format", "breakdown", "reported_cost", "drift"]}``.
    Raises ``QuoteRequestError``, ``UsageError``, ``PricingError`` or ``PriceNotFound``.
    """
    if not isinstance(request, Mapping):
        raise QuoteRequestError("request", "must be a JSON object")
    model = request.get("provider_model_id")
    if not isinstance(model, str) or not model.strip():
        raise QuoteRequestError("provider_model_id", "is required (a model id string)")
    at_raw = request.get("at")
    at = parse_time(at_raw) if at_raw is not None else None
    fmt_name = request.get("format")
    if fmt_name is not None and not isinstance(fmt_name, str):
        raise QuoteRequestError("format", "must be a string")

    what_if = request.get("pricing")
    if what_if is not None:
        try:
            pricing = parse_pricing(what_if, model)
        except VariablePricing:
            raise PricingError("prompt", "a variable price (-1) cannot be quoted") from None
        answer: dict[str, Any] = {
            "provider_model_id": model,
            "model": model,
            "pricing": pricing.to_json(),
            "price_version": None,
            "effective_from": None,
            "price_source": "request",
        }
        version_no = None
    else:
        version = book.lookup(model, at)
        pricing = version.pricing
        version_no = version.version
        answer = {
            "provider_model_id": model,
            "model": version.model,
            "pricing": dict(version.pricing_json),
            "price_version": version.version,
            "effective_from": version.effective_from_iso,
            "price_source": version.source,
        }

    usage_raw = request.get("usage")
    if usage_raw is None:
        return answer
    parsed = parse_usage(usage_raw, fmt_name)
    when = at or datetime.now(UTC)  # time-of-day tiers need a time even for "now" quotes
    breakdown = compute_cost(parsed.usage, pricing, at=when, price_version=version_no)
    answer["usage"] = parsed.usage.as_dict()
    answer["usage_format"] = parsed.format
    answer["breakdown"] = breakdown.to_json()
    charge = parsed.reported.provider_charge if parsed.reported else None
    if charge is not None and parsed.reported is not None:
        answer["reported_cost"] = fmt(charge)
        answer["reported_is_byok"] = parsed.reported.is_byok
        answer["drift"] = fmt(difference(breakdown.total_cost, charge))
    return answer


def error_json(exc: BillingError) -> dict[str, Any]:
    """The JSON body describing a core error, shared by the HTTP API and the CLI."""
    body: dict[str, Any] = {"error": str(exc)}
    if isinstance(exc, PriceNotFound):
        body.update(error=exc.reason, model=exc.model, suggestions=exc.suggestions)
    elif isinstance(exc, PricingError):
        body["field"] = f"pricing.{exc.field}" if exc.field else "pricing"
    elif isinstance(exc, FieldError):
        body["field"] = exc.field
    return body
