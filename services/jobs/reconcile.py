"""Monthly reconciliation: our per-model totals for a UTC month beside a provider's export.

``billing reconcile --month YYYY-MM --invoice FILE.csv`` is the second of the design's two
checks; the first, per request, is ``GET /internal/billing/drift`` and the projector's
``billing_reported_cost_*`` metrics. Reading the CSV (``services.core.provider_invoice``) and
comparing are plain functions (unit-tested); the command only reads the database and prints.

Errors: ``InvoiceError`` (a ``ValueError``, ``services.core.provider_invoice``): the export cannot
be read; its message names the line and the column. The command turns it, and every other
reason no comparison could be made, into ``ReconcileError`` (exit status 2).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Context as DecimalContext
from decimal import Decimal, localcontext
from typing import TYPE_CHECKING, Any

import click

from services.core.money import EXACT, ZERO

if TYPE_CHECKING:
    import asyncpg


_ROUNDED = DecimalContext(prec=60)  # for display and ratios only, never for sums


class ReconcileError(click.ClickException):
    """No comparison could be made: bad input, no database (exit status 2)."""

    exit_code = 2


# -- comparing ---------------------------------------------------------------------------------


def canonical_totals(
    totals: Mapping[str, Decimal], resolve: Callable[[str], str | None]
) -> tuple[dict[str, Decimal], list[str]]:
    """Re-key the export's totals by the price book's canonical ids (permaslugs such as
    ``openai/gpt-4.1-2025-04-14`` resolve through aliases); names the book does not know
    are kept as they are and listed."""
    merged: dict[str, Decimal] = {}
    unknown: list[str] = []
    with localcontext(EXACT):
        for name, amount in totals.items():
            canonical = resolve(name)
            if canonical is None:
                unknown.append(name)
                canonical = name
            merged[canonical] = merged.get(canonical, ZERO) + amount
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
        with localcontext(EXACT):
            return (self.ours or ZERO) - (self.theirs or ZERO)

    @property
    def percent(self) -> Decimal | None:
        """The difference as a percentage of theirs (``None`` when theirs is zero)."""
        if not self.theirs:
            return None
        with localcontext(_ROUNDED):
            return self.difference * 100 / self.theirs

    @property
    def off(self) -> bool:
        """More than ``tolerance_pct`` away from theirs (any difference when theirs is 0)."""
        with localcontext(EXACT):
            return abs(self.difference) * 100 > self.tolerance_pct * abs(self.theirs or ZERO)

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
        year, month = int(match.group(1)), int(match.group(2))
        start = datetime(year, month, 1, tzinfo=UTC)
        end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    except ValueError:  # no match, month 13, year 0 or past 9998
        raise ValueError(f"--month must be YYYY-MM, e.g. 2026-11 (got {text!r:.40})") from None
    return start, end


async def our_totals(
    connection: asyncpg.Connection,
    start: datetime,
    end: datetime,
    tenant: str | None = None,
    provider: str | None = None,
) -> dict[str, Decimal]:
    """Sum of ``total_cost`` per model of the transactions that occurred in [start, end)."""
    conditions = ["occurred_at >= $1", "occurred_at < $2"]
    args: list[Any] = [start, end]
    for column, value in (("tenant_id", tenant), ("provider", provider)):
        if value is not None:
            args.append(value)
            conditions.append(f"{column} = ${len(args)}")
    rows = await connection.fetch(
        "SELECT model, sum(total_cost) AS total FROM billing_transactions"  # noqa: S608
        f" WHERE {' AND '.join(conditions)} GROUP BY model",
        *args,
    )
    return {r["model"]: r["total"] for r in rows}


# -- the command -------------------------------------------------------------------------------
