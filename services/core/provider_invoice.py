"""A provider's invoice export read and summed per model: its columns, amounts and dates.

Plain functions over the CSV's text (no database, no click), unit-tested; ``billing
reconcile`` (``services.jobs.reconcile``) compares the sums with our totals.

Errors: ``InvoiceError`` (a ``ValueError``): the export cannot be read; its message names the
line and the column.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from services.core.money import ZERO, to_decimal, total

MODEL_COLUMNS = ("model", "model_permaslug")
COST_COLUMNS = ("cost_total", "cost", "total_cost", "total", "usage", "amount")
DATE_COLUMNS = ("created_at", "date", "day")
BYOK_COLUMN = "byok_usage_inference"
"""Header names, matched case-insensitively; the first of each tuple present is used."""


class InvoiceError(ValueError):
    """The invoice export cannot be read (the message names the line and column)."""


_GROUPED = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_money(text: str) -> Decimal:
    """A US-style amount as an exact ``Decimal``: ``1.23``, ``$1.23``, ``-$1,234.56``,
    ``1.5e-05``, ``USD 3``. Raise ``ValueError`` saying why otherwise (``1,5``, ``1.234,56``
    and ``(1.23)`` are refused: a comma only separates thousands)."""
    value = text.strip()
    upper = value.upper()
    if upper.startswith("USD"):
        value = value[3:].strip()
    elif upper.endswith("USD"):
        value = value[:-3].strip()
    sign = ""
    if value[:1] in ("-", "+"):
        sign, value = value[0], value[1:].lstrip()
    if value.startswith("$"):
        value = value[1:].lstrip()
    if not sign and value[:1] in ("-", "+"):
        sign, value = value[0], value[1:]
    if _GROUPED.fullmatch(value):
        value = value.replace(",", "")
    elif not _NUMBER.fullmatch(value):
        raise ValueError(
            f"{text.strip()!r:.40} is not an amount (write 1234.56, $1,234.56 or 1.5e-05;"
            " a comma only separates thousands)"
        )
    return to_decimal(sign + value)


def parse_when(text: str) -> datetime:
    """A date (``2026-11-03``) or ISO 8601 time as an aware UTC time; without an offset,
    UTC (``2026-11-03 18:54:30.040``, as OpenRouter's export writes it)."""
    value = text.strip()
    if value[-4:].upper() == " UTC":
        value = value[:-4]
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC)
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text.strip()!r:.40} is not a date or an ISO 8601 time") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Layout:
    """Which header columns hold what (positions in the row)."""

    header: tuple[str, ...]
    model: int
    cost: int
    date: int | None
    byok: int | None

    @property
    def shape(self) -> str:
        openrouter = {"model_permaslug", "cost_total", BYOK_COLUMN, "generation_id"}
        return "openrouter" if openrouter & set(self.header) else "simple"

    def describe(self) -> str:
        used = [self.model, self.cost, self.date, self.byok]
        return f"{self.shape}: " + ", ".join(self.header[i] for i in used if i is not None)


def detect_layout(header: Iterable[str]) -> Layout:
    """Find the model, cost, date and BYOK columns of a header line."""
    names = tuple(h.strip().lstrip("\ufeff").lower() for h in header)
    seen: set[str] = set()
    for name in names:
        if name and name in seen:
            raise InvoiceError(f"line 1: column {name!r} appears twice in the header")
        seen.add(name)

    def first(candidates: tuple[str, ...]) -> int | None:
        return next((names.index(c) for c in candidates if c in names), None)

    model, cost = first(MODEL_COLUMNS), first(COST_COLUMNS)
    missing = [
        f"{what} column ({' or '.join(candidates)})"
        for what, found, candidates in (
            ("model", model, MODEL_COLUMNS),
            ("cost", cost, COST_COLUMNS),
        )
        if found is None
    ]
    if model is None or cost is None:
        raise InvoiceError(
            f"line 1: the header ({', '.join(names)[:200]}) has no {' and no '.join(missing)}"
        )
    byok = names.index(BYOK_COLUMN) if BYOK_COLUMN in names else None
    return Layout(names, model, cost, first(DATE_COLUMNS), byok)


@dataclass(slots=True)
class Invoice:
    """An export summed per model (the export's own model names)."""

    layout: Layout
    totals: dict[str, Decimal] = field(default_factory=dict)
    rows: int = 0
    """Rows summed (inside the month, or every row when there is no date column)."""
    outside: int = 0
    """Rows dated outside the month, ignored."""
    byok_rows: int = 0
    """Rows taken at their ``byok_usage_inference`` rather than their cost."""


def read_invoice(lines: Iterable[str], start: datetime, end: datetime) -> Invoice:
    """Sum an export per model over [start, end); raise ``InvoiceError`` naming the line.

    ``lines`` as from a file opened with ``newline=""`` (quoted fields may span lines).
    """
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise InvoiceError("the file is empty (expected a header line such as model,cost)")
        invoice = Invoice(detect_layout(header))
        for fields in reader:
            _add_row(invoice, fields, reader.line_num, start, end)
    except csv.Error as exc:
        raise InvoiceError(f"line {reader.line_num}: not valid CSV ({exc})") from None
    return invoice


def _add_row(
    invoice: Invoice, fields: list[str], line: int, start: datetime, end: datetime
) -> None:
    layout = invoice.layout
    if not any(f.strip() for f in fields):
        return  # a blank line
    if len(fields) != len(layout.header):
        raise InvoiceError(
            f"line {line}: {len(fields)} fields where the header has {len(layout.header)}"
        )

    def cell(index: int, parse: Callable[[str], Any]) -> Any:
        try:
            return parse(fields[index])
        except ValueError as exc:
            raise InvoiceError(f"line {line}, column {layout.header[index]!r}: {exc}") from None

    if layout.date is not None:
        when: datetime = cell(layout.date, parse_when)
        if not start <= when < end:
            invoice.outside += 1
            return
    model = fields[layout.model].strip()
    if not model:
        raise InvoiceError(f"line {line}, column {layout.header[layout.model]!r}: no model")
    amount: Decimal = cell(layout.cost, _amount)
    if layout.byok is not None:
        inference: Decimal = cell(layout.byok, _amount)
        if inference > 0:  # BYOK: the provider's charge is what we price, not the fee
            amount = inference
            invoice.byok_rows += 1
    invoice.totals[model] = total((invoice.totals.get(model, ZERO), amount))
    invoice.rows += 1


def _amount(text: str) -> Decimal:
    return parse_money(text) if text.strip() else ZERO  # an empty cell is no charge
