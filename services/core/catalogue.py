"""OpenRouter's model catalogue (``GET /api/v1/models``) and how it feeds the price book."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from importlib import resources
from typing import Any

from services.core.errors import PricingError, VariablePricing
from services.core.pricebook import PriceBook
from services.core.pricing import ModelPricing, parse_pricing


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    model: str
    pricing: ModelPricing
    canonical_slug: str | None = None
    name: str | None = None
    effective_from: datetime | None = None
    """Only in the project's own snapshot: when this price is known to have been in effect."""


@dataclass(frozen=True, slots=True)
class Catalogue:
    entries: list[CatalogueEntry]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(model id, reason) for entries that carry no usable fixed price."""


@dataclass(slots=True)
class SyncReport:
    models: int = 0
    new_versions: int = 0
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "models": self.models,
            "new_versions": self.new_versions,
            "unchanged": self.unchanged,
            "skipped": [{"model": m, "reason": r} for m, r in self.skipped],
        }


def parse_catalogue(document: object) -> Catalogue:
    """Parse a ``/models`` response (``{"data": [...]}`` or a bare list), either shape.

    Entries with a variable (``-1``) or malformed price are skipped with a reason rather than
    failing the whole catalogue: one bad row must not stop every other price from updating.
    """
    rows = document.get("data") if isinstance(document, Mapping) else document
    if not isinstance(rows, list):
        raise PricingError("data", "a model catalogue must be a list under 'data'")
    entries: list[CatalogueEntry] = []
    skipped: list[tuple[str, str]] = []
    for index, row in enumerate(rows):
        model = row.get("id") if isinstance(row, Mapping) else None
        if not isinstance(model, str) or not model:
            skipped.append((f"data[{index}]", "entry has no model id"))
            continue
        try:
            pricing = parse_pricing(row.get("pricing"), model)
        except VariablePricing as exc:
            skipped.append((model, exc.reason))
            continue
        except PricingError as exc:
            skipped.append((model, str(exc)))
            continue
        try:
            effective = _parse_time(row["effective_from"]) if row.get("effective_from") else None
        except ValueError as exc:
            skipped.append((model, f"effective_from: {exc}"))
            continue
        slug = row.get("canonical_slug")
        entries.append(
            CatalogueEntry(
                model=model,
                pricing=pricing,
                canonical_slug=slug if isinstance(slug, str) and slug else None,
                name=row.get("name") if isinstance(row.get("name"), str) else None,
                effective_from=effective,
            )
        )
    return Catalogue(entries, skipped)


def _parse_time(value: object) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"{value!r} is not RFC 3339") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no timezone")
    return parsed


def slug_aliases(catalogue: Catalogue) -> dict[str, str]:
    """``canonical_slug`` → model id, for slugs that name exactly one base model.

    A paid model and its ``:batch``/``:free`` variants share one slug; the slug (which is
    what OpenRouter reports as a response's ``model``) must resolve to the base model, never
    to a discounted or free variant. A slug shared by two base models is left out.
    """
    bases: dict[str, set[str]] = {}
    for entry in catalogue.entries:
        if entry.canonical_slug and ":" not in entry.model:
            bases.setdefault(entry.canonical_slug, set()).add(entry.model)
    return {
        slug: next(iter(models))
        for slug, models in bases.items()
        if len(models) == 1 and slug not in models
    }


def apply_catalogue(
    book: PriceBook, catalogue: Catalogue, *, observed_at: datetime, source: str
) -> SyncReport:
    """Record every changed price as a new catalogue version.

    A price seen for the first time, or different from the one in effect, becomes a version
    effective from ``observed_at`` (when we learnt of it) unless the entry states its own
    ``effective_from``. Canonical slugs become aliases.
    """
    report = SyncReport(models=len(catalogue.entries), skipped=list(catalogue.skipped))
    for slug, model in slug_aliases(catalogue).items():
        book.add_alias(slug, model)
    for entry in catalogue.entries:
        recorded = book.record(
            entry.model,
            entry.pricing,
            effective_from=entry.effective_from or observed_at,
            layer="catalogue",
            source=source,
        )
        if recorded is None:
            report.unchanged += 1
        else:
            report.new_versions += 1
    return report


def default_catalogue() -> Catalogue:
    """The project's own offline price list (a dozen common models), bundled with the package."""
    text = resources.files("services.core").joinpath("data/default_prices.json").read_text()
    return parse_catalogue(json.loads(text, parse_float=Decimal))
