"""Re-rating a window of history at the prices now in effect (pure).

A request is re-rated from its usage fact and what the read model holds for it now
(:class:`Current`): priced again at its ``occurred_at`` under the newest price-book version,
it becomes the next revision when its total moves, and nothing when it does not — so a
second run of the same re-rate changes nothing. :class:`Report` is the diff per tenant ×
model that a run prints or writes; reading the facts and emitting the revisions is
``services.jobs.reprice``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from services.core.errors import PriceNotFound
from services.core.events import UsagePriced, UsageRecorded
from services.core.money import ZERO, difference, fmt, total
from services.core.pricebook import PriceLookup
from services.core.rating import price, rate
from services.core.usage import Usage

DIFF_COLUMNS = ("tenant_id", "model", "requests_changed", "old_total", "new_total", "delta")


@dataclass(frozen=True, slots=True)
class Window:
    """Which requests a run re-rates: those that occurred in ``[since, until)``."""

    since: datetime
    until: datetime
    model: str | None = None
    """Only requests priced as this model (resolved through the price book's aliases)."""
    tenant: str | None = None

    def __post_init__(self) -> None:
        if self.since >= self.until:
            raise ValueError("--since must be before --until")

    def holds(self, fact: UsageRecorded, model: str | None) -> bool:
        """Whether ``fact``, priced as ``model`` (``None``: no price), is in the window."""
        return (
            self.since <= fact.occurred_at < self.until
            and (self.tenant is None or fact.tenant_id == self.tenant)
            and (self.model is None or model == self.model)
        )


def model_of(book: PriceLookup, fact: UsageRecorded) -> str | None:
    """The canonical model ``fact`` is priced as at its time (``None``: it has no price)."""
    try:
        return book.lookup(fact.provider_model_id, fact.occurred_at).model
    except PriceNotFound:
        return None


@dataclass(frozen=True, slots=True)
class Current:
    """What the read model holds for a request now."""

    revision: int
    total_cost: Decimal


@dataclass(slots=True)
class Line:
    """The requests of one tenant × model that changed, and their totals before and after."""

    requests: int = 0
    old_total: Decimal = ZERO
    new_total: Decimal = ZERO

    @property
    def delta(self) -> Decimal:
        return difference(self.new_total, self.old_total)


@dataclass(slots=True)
class Report:
    """The diff per tenant × model, and what the run saw."""

    run_id: str
    lines: dict[tuple[str, str], Line] = field(default_factory=dict)
    scanned: int = 0
    unpriced: int = 0
    """Requests with no price at their time (left as they are)."""
    not_billed: int = 0
    """Usage facts (from the topic) with no transaction yet: the pricer will price them."""
    emitted: int = 0
    applied: int | None = None

    def add(self, tenant: str, model: str, old: Decimal, new: Decimal) -> None:
        """Count one changed request of ``tenant`` × ``model`` going from ``old`` to ``new``."""
        line = self.lines.get((tenant, model))
        if line is None:
            line = self.lines[(tenant, model)] = Line()
        line.requests += 1
        line.old_total = total((line.old_total, old))
        line.new_total = total((line.new_total, new))

    @property
    def changed(self) -> int:
        return sum(line.requests for line in self.lines.values())

    @property
    def delta(self) -> Decimal:
        """The sum of every line's delta, exactly."""
        return total(line.delta for line in self.lines.values())

    def rows(self) -> list[dict[str, str | int]]:
        """The diff, one row per tenant × model in order, amounts as decimal strings."""
        return [
            {
                "tenant_id": tenant,
                "model": model,
                "requests_changed": line.requests,
                "old_total": fmt(line.old_total),
                "new_total": fmt(line.new_total),
                "delta": fmt(line.delta),
            }
            for (tenant, model), line in sorted(self.lines.items())
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "scanned": self.scanned,
            "changed": self.changed,
            "unpriced": self.unpriced,
            "not_billed": self.not_billed,
            "emitted": self.emitted,
            "applied": self.applied,
            "delta": fmt(self.delta),
            "diff": self.rows(),
        }

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, DIFF_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows())
        return out.getvalue()

    def render(self, suffix: str) -> str:
        """For a file named ``*{suffix}``: ``.json`` → the whole report; else the diff as CSV."""
        if suffix.lower() == ".json":
            return json.dumps(self.to_json(), indent=2) + "\n"
        return self.to_csv()


def rerate(
    fact: UsageRecorded, current: Current, book: PriceLookup, priced_at: datetime, reason: str
) -> UsagePriced | None:
    """The next revision of ``fact`` at today's prices, or ``None`` when its cost is the
    same (raises ``PriceNotFound`` when it has no price at its time)."""
    priced = rate(
        fact,
        book,
        priced_at=priced_at,
        revision=current.revision + 1,
        previous_total=current.total_cost,
        reason=reason,
    )
    return None if priced.total_cost == current.total_cost else priced


def rerate_all(
    pairs: Iterable[tuple[UsageRecorded, Current]],
    book: PriceLookup,
    priced_at: datetime,
    reason: str,
    report: Report,
) -> list[UsagePriced]:
    """The next revisions of the requests whose cost moves, each added to ``report``; a
    request with no price at its time is counted as unpriced and left as it is."""
    revised: list[UsagePriced] = []
    for fact, current in pairs:
        try:
            priced = rerate(fact, current, book, priced_at, reason)
        except PriceNotFound:
            report.unpriced += 1
            continue
        if priced is not None:
            revised.append(priced)
            report.add(fact.tenant_id, priced.model, current.total_cost, priced.total_cost)
    return revised


def cost_moved(
    book: PriceLookup, model: str, usage: Usage, occurred_at: datetime, total_cost: Decimal
) -> bool:
    """Whether ``usage`` of ``model`` now costs other than ``total_cost`` (raises
    ``PriceNotFound``): the cheap test a stored row passes before it becomes an event,
    since most rows of a window do not change."""
    _, breakdown = price(book, model, usage, occurred_at)
    return breakdown.total_cost != total_cost
