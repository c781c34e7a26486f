"""Monthly invoices: what one says and how its numbers add up (issue #12). Pure.

An invoice is issued once per tenant and closed UTC month. Its lines: one per model of the
month's usage; one per (earlier closed month, model) whose total has changed since it was
invoiced (usage that arrived late, a re-rating) — an *adjustment* naming that month; the
prepaid credits applied (negative); and the rounding. The **subtotal** is the exact sum of
the usage and adjustment amounts, so an invoice's usage equals its month's summary exactly;
the **amount due** is the subtotal less the credits applied, rounded to cents half-even.
Every line is shown to 1e-9 USD (half-even) and the rounding line takes what the lines'
rounding and the cents' leave, so the lines always add up to the amount due.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext
from typing import Any, Literal

from services.core.money import EXACT, fmt

ZERO = Decimal(0)
CENT = Decimal("0.01")
LINE_PLACES = Decimal("1e-9")
ROUNDING = Context(prec=80, rounding=ROUND_HALF_EVEN)
"""Where this module rounds on purpose (everything else is exact: ``money.EXACT``)."""
ROUNDING_RULE = (
    "amount due rounded to cents, half to even; lines shown to 1e-9 USD, half to even; the"
    " rounding line is the difference, so the lines add up to the amount due"
)

LineKind = Literal["usage", "adjustment", "credits", "rounding"]
TOKEN_FIELDS = (
    "uncached_input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "completion_tokens",
    "reasoning_tokens",
)


@dataclass(frozen=True, slots=True)
class Usage:
    """One model's usage in one month (summed from the read models)."""

    model: str
    requests: int
    tokens: dict[str, int]
    amount: Decimal


@dataclass(frozen=True, slots=True)
class Line:
    kind: LineKind
    description: str
    amount: Decimal
    """As shown: to 1e-9 (the rounding line: whatever makes the lines add up)."""
    exact_amount: Decimal
    model: str | None = None
    period_of: date | None = None
    requests: int = 0
    tokens: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Invoice:
    number: str
    tenant_id: str
    period: date
    issued_at: datetime
    lines: tuple[Line, ...]
    subtotal: Decimal
    credits_applied: Decimal
    amount_due: Decimal

    def document(self) -> dict[str, Any]:
        """The invoice as JSON: money as decimal strings."""
        return {
            "number": self.number,
            "tenant_id": self.tenant_id,
            "period": f"{self.period:%Y-%m}",
            "issued_at": self.issued_at.isoformat().replace("+00:00", "Z"),
            "currency": "USD",
            "lines": [_line_json(line) for line in self.lines],
            "subtotal": fmt(self.subtotal),
            "credits_applied": fmt(self.credits_applied),
            "amount_due": format(self.amount_due, "f"),  # to the cent: "12.30"
            "rounding": ROUNDING_RULE,
        }


def invoice_number(issuer: str, period: date, sequence: int) -> str:
    """``INV-2026-11-000042``: the issuer, the invoiced month, the issuer's gapless count."""
    return f"{issuer}-{period:%Y-%m}-{sequence:06d}"


def build_invoice(
    *,
    number: str,
    tenant_id: str,
    period: date,
    issued_at: datetime,
    usage: Sequence[Usage],
    adjustments: Sequence[tuple[date, str, Decimal]],
    credits: tuple[Decimal, Decimal] = (ZERO, ZERO),
) -> Invoice:
    """The invoice of ``usage`` (the month's, per model) and ``adjustments`` ((earlier month,
    model, change since invoiced)), with ``credits`` = (prepaid credit still to apply, credit
    applied by earlier invoices): up to the first pays a positive subtotal; a negative one
    (refunds) gives back credit applied before, up to all of it, before anything is owed to
    the tenant."""
    lines: list[Line] = []
    with localcontext(EXACT):
        for item in sorted(usage, key=lambda u: u.model):
            lines.append(
                Line(
                    "usage",
                    f"{item.model}: {item.requests} requests",
                    _shown(item.amount),
                    item.amount,
                    item.model,
                    period,
                    item.requests,
                    dict(item.tokens),
                )
            )
        for month, model, change in sorted(adjustments):
            lines.append(
                Line(
                    "adjustment",
                    f"{model}: change to {month:%Y-%m} since it was invoiced",
                    _shown(change),
                    change,
                    model,
                    month,
                )
            )
        subtotal = sum((line.exact_amount for line in lines), ZERO)
        available, applied_before = credits
        if subtotal >= 0:
            credits_applied = min(subtotal, max(available, ZERO))
        else:  # a refund returns prepaid credit first (it was paid with it)
            credits_applied = max(subtotal, -max(applied_before, ZERO))
        if credits_applied:
            what = "prepaid credits applied"
            if credits_applied < 0:
                what = "prepaid credits returned (a refund of usage paid with them)"
            lines.append(Line("credits", what, _shown(-credits_applied), -credits_applied))
        amount_due = (subtotal - credits_applied).quantize(CENT, context=ROUNDING)
        shown = sum((line.amount for line in lines), ZERO)
        if shown != amount_due:
            rounding = amount_due - shown
            lines.append(Line("rounding", "rounding", rounding, rounding))
    return Invoice(
        number, tenant_id, period, issued_at, tuple(lines), subtotal, credits_applied, amount_due
    )


def _shown(amount: Decimal) -> Decimal:
    return amount.quantize(LINE_PLACES, context=ROUNDING)


def _line_json(line: Line) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": line.kind, "description": line.description}
    if line.model is not None:
        out["model"] = line.model
    if line.period_of is not None:
        out["period"] = f"{line.period_of:%Y-%m}"
    if line.kind == "usage":
        out["requests"] = line.requests
        out.update(line.tokens)
    out["amount"] = fmt(line.amount)
    return out
