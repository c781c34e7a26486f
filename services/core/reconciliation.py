"""Monthly reconciliation: our per-model totals beside a provider's invoice (pure).

The invoice's totals are re-keyed by the price book's canonical model ids
(:func:`canonical_totals`), then compared model by model (:func:`compare`): a model is off
when it is more than the tolerance away from the invoice. Sums and differences are exact;
only the percentage shown is rounded. Reading the export is ``services.core.provider_invoice``;
our totals come from the database (``services.jobs.reconcile``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Context, Decimal

from services.core import money
from services.core.money import ZERO, product, total
from services.core.periods import month_bounds

ROUNDED = Context(prec=60)
"""For display and ratios only, never for sums."""


def canonical_totals(
    totals: Mapping[str, Decimal], resolve: Callable[[str], str | None]
) -> tuple[dict[str, Decimal], list[str]]:
    """Re-key the export's totals by the price book's canonical ids (permaslugs such as
    ``openai/gpt-4.1-2025-04-14`` resolve through aliases); names the book does not know
    are kept as they are and listed."""
    merged: dict[str, Decimal] = {}
    unknown: list[str] = []
    for name, amount in totals.items():
        canonical = resolve(name)
        if canonical is None:
            unknown.append(name)
            canonical = name
        merged[canonical] = total((merged.get(canonical, ZERO), amount))
    return merged, sorted(unknown)


@dataclass(frozen=True, slots=True)
class Line:
    """One model: our total and theirs (``None``: absent on that side)."""

    model: str
    ours: Decimal | None
    theirs: Decimal | None
    tolerance_pct: Decimal

    @property
    def difference(self) -> Decimal:
        return money.difference(self.ours or ZERO, self.theirs or ZERO)

    @property
    def percent(self) -> Decimal | None:
        """The difference as a percentage of theirs (``None`` when theirs is zero)."""
        if not self.theirs:
            return None
        return ROUNDED.divide(ROUNDED.multiply(self.difference, 100), self.theirs)

    @property
    def off(self) -> bool:
        """More than ``tolerance_pct`` away from theirs (any difference when theirs is 0)."""
        # copy_abs, not abs(): abs() rounds to the current context's 28 digits.
        allowed = product(self.tolerance_pct, (self.theirs or ZERO).copy_abs())
        return product(self.difference.copy_abs(), 100) > allowed

    @property
    def status(self) -> str:
        if self.ours is None:
            return "ONLY THEIRS" + (" OFF" if self.off else "")
        if self.theirs is None:
            return "ONLY OURS" + (" OFF" if self.off else "")
        return "OFF" if self.off else "ok"


def compare(
    ours: Mapping[str, Decimal], theirs: Mapping[str, Decimal], tolerance_pct: Decimal
) -> list[Line]:
    """One line per model on either side, by model id."""
    return [
        Line(model, ours.get(model), theirs.get(model), tolerance_pct)
        for model in sorted(set(ours) | set(theirs))
    ]


def parse_month(text: str) -> tuple[datetime, datetime]:
    """``YYYY-MM`` → [first instant, first instant of the next month), UTC."""
    match = re.fullmatch(r"(\d{4})-(\d{2})", text.strip())
    try:
        if match is None:
            raise ValueError
        bounds = month_bounds(date(int(match.group(1)), int(match.group(2)), 1))
    except ValueError:  # no match, month 13, year 0 or past 9998
        raise ValueError(f"--month must be YYYY-MM, e.g. 2026-11 (got {text!r:.40})") from None
    return bounds
