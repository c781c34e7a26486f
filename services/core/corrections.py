"""Price corrections: a new price-book version, never an edit of an old one.

A correction is an analyst's fact — "gpt-4o's prompt price was wrong from March 3", "our
negotiated discount starts on the 1st", "this model was priced late" — recorded as a new
version (in the override layer by default, so a later catalogue refresh does not undo it)
with who made it and why.
The prices it names replace those of the version in effect at ``effective_from``; the rest
(cache prices, request fees, long-context tiers) carry over unchanged. History is then
re-rated by ``billing reprice``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from typing import Final

from services.core.errors import PriceNotFound, PricingError
from services.core.money import to_decimal
from services.core.pricebook import Layer, PriceBook, PriceVersion
from services.core.pricing import ModelPricing

CORRECTABLE: Final = ("prompt", "completion", "input_cache_read", "input_cache_write")
"""The per-token prices a correction may set (USD per token, as in the catalogue)."""
MILLION: Final = Decimal(1_000_000)


def parse_changes(raw: Mapping[str, object], *, per_million: bool = False) -> dict[str, Decimal]:
    """The prices named in ``raw`` (``None`` values ignored), checked: finite, not negative.

    ``per_million``: the values are USD per million tokens (as analysts quote them)."""
    changes: dict[str, Decimal] = {}
    for key in CORRECTABLE:
        value = raw.get(key)
        if value is None:
            continue
        try:
            price = to_decimal(value)
        except ValueError as exc:
            raise PricingError(key, str(exc)) from None
        if price < 0:
            raise PricingError(key, "must not be negative")
        if per_million:
            try:  # an exact shift, then the same bounds as any price (≤ 30 places)
                price = to_decimal(price.scaleb(-6))
            except ValueError as exc:
                raise PricingError(key, f"per token, {exc}") from None
        changes[key] = price
    if not changes:
        raise PricingError("", f"name at least one price to correct: {', '.join(CORRECTABLE)}")
    return changes


def record_correction(
    book: PriceBook,
    model: str,
    changes: Mapping[str, Decimal],
    *,
    effective_from: datetime,
    reason: str,
    by: str,
    layer: Layer = "override",
) -> tuple[PriceVersion | None, PriceVersion | None]:
    """Record the correction; ``(new version or None when nothing changes, the base)``.

    ``layer="override"`` (the default) pins the model's whole price from ``effective_from``
    until the next correction: later catalogue changes do not apply to it — right for a
    negotiated price. ``layer="catalogue"`` corrects the catalogue's history instead: the
    next catalogue change supersedes it — right for a catalogue price that was wrong.

    Raises ``PricingError`` for an empty reason, or when a model with no price yet is not
    given both a prompt and a completion price.
    """
    book.reload()  # the base is the newest version, whoever recorded it
    if not reason.strip():
        raise PricingError("reason", "say why the price changes (kept in the audit trail)")
    if not by.strip():
        raise PricingError("by", "say who changes the price")
    canonical = book.resolve(model) or model
    try:
        base: PriceVersion | None = book.lookup(canonical, effective_from)
    except PriceNotFound:
        base = None
    if base is not None:
        pricing = replace(base.pricing, **changes)  # type: ignore[arg-type]  # checked keys
    else:
        missing = [key for key in ("prompt", "completion") if key not in changes]
        if missing:
            raise PricingError(
                missing[0], f"{canonical} has no price at {effective_from.isoformat()}: give it"
            )
        pricing = ModelPricing(**changes)  # type: ignore[arg-type]  # checked keys
    version = book.record(
        canonical,
        pricing,
        effective_from=effective_from,
        layer=layer,
        source=f"correction by {by.strip()}",
        reason=reason.strip(),
    )
    return version, base
