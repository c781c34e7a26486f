"""``billing reconcile``: our totals for a month against a provider's invoice.

Every reason no comparison could be made (bad input, an unreadable export, the job's
``ReconcileError``) leaves with exit status 2; a model off the invoice, with 1.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

import click

from services.cli.context import Context
from services.core.money import ZERO, to_decimal, total
from services.core.provider_invoice import BYOK_COLUMN, Invoice, InvoiceError, read_invoice
from services.core.reconciliation import ROUNDED, Line, canonical_totals, compare, parse_month
from services.jobs.reconcile import ReconcileError, fetch_totals


class NoComparison(click.ClickException):
    """No comparison could be made: bad input, no database (exit status 2)."""

    exit_code = 2


@click.command("reconcile")
@click.option("--month", required=True, help="The UTC month to reconcile, YYYY-MM.")
@click.option(
    "--invoice",
    "invoice_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The provider's export (CSV; shapes above).",
)
@click.option(
    "--tolerance-pct",
    default="1",
    show_default=True,
    help="A model more than this many percent off the invoice fails the check.",
)
@click.option("--tenant", default=None, help="Only this tenant's transactions.")
@click.option(
    "--provider",
    default=None,
    help="Only transactions of this provider (e.g. openrouter: an OpenRouter invoice does "
    "not cover Gemini/Vertex traffic).",
)
@click.pass_obj
def reconcile_cmd(
    obj: Context,
    month: str,
    invoice_path: Path,
    tolerance_pct: str,
    tenant: str | None,
    provider: str | None,
) -> None:
    """Compare a UTC month's per-model totals with a provider's invoice export.

    Ours: once the month is closed, what its issued invoices say per model plus the
    adjustments later invoices made to it; before (or with --provider), the sum of total_cost
    per model of billing_transactions that occurred in the month (every tenant unless
    --tenant). The output says which. Theirs: the CSV summed per model, its model names mapped
    to ours through the price book (aliases, e.g. OpenRouter permaslugs; unknown names are
    compared as written and listed). Prints model, ours, theirs, difference and % (of
    theirs), models found on one side only, and the invoice rows ignored.

    \b
    The CSV: UTF-8 (a BOM is fine), a header line; column names are matched
    without regard to case, other columns are ignored.
      model   the first of: model, model_permaslug
      cost    the first of: cost_total, cost, total_cost, total, usage, amount
      date    optional, the first of: created_at, date, day; a date (2026-11-03)
              or an ISO 8601 time, UTC when it has no offset. Rows outside the
              month are ignored and counted; without it every row counts.
      byok_usage_inference  optional; where positive, the row counts at this
              amount (the provider's inference charge, which is what we price)
              instead of its cost (OpenRouter's BYOK fee).
    Shapes this fits:
      simple      model,cost - a row per model, or per day and model (summed)
      OpenRouter  the per-generation export: generation_id, created_at,
                  cost_total, byok_usage_inference, tokens_prompt, ...,
                  model_permaslug, provider_name, ...
      OpenRouter  /api/v1/activity rows written as CSV: date, model,
                  model_permaslug, usage, byok_usage_inference, requests, ...
    The OpenRouter names are those third-party parsers of its exports read; no
    published specification of the CSV could be found to confirm them.
    Amounts: 1.23, $1.23, -$1,234.56, 1.5e-05, USD 3; an empty cell is 0. A
    comma only separates thousands: 1,5 and 1.234,56 are refused.

    \b
    Exit status:
      0  every model within --tolerance-pct of the invoice
      1  some model is not (one on a single side counts unless its total is 0)
      2  no comparison was made: bad --month, unreadable CSV, missing column or
         bad cell (the message names line and column), no database
    """
    try:
        start, end = parse_month(month)
        tolerance = to_decimal(tolerance_pct)
        if tolerance < 0:
            raise ValueError("--tolerance-pct must not be negative")
    except ValueError as exc:
        message = str(exc) if str(exc).startswith("--") else f"--tolerance-pct: {exc}"
        raise NoComparison(message) from None
    invoice = _read(invoice_path, start, end)
    ours, source = _our_totals(obj, start, end, tenant, provider)
    theirs, unknown = canonical_totals(invoice.totals, _resolver(obj))
    lines = compare(ours, theirs, tolerance)

    scope = f"tenant {tenant}" if tenant else "all tenants"
    scope += f", provider {provider}" if provider else ", all providers"
    click.echo(f"reconcile {month} (UTC), {scope}, against {invoice_path.name}")
    click.echo(f"invoice columns ({invoice.layout.describe()})")
    click.echo(f"ours: {source}")
    click.echo()
    _print_table(lines)
    click.echo()
    notes = [f"invoice: {invoice.rows} row(s) counted"]
    if invoice.layout.date is None:
        notes.append("no date column: every row taken as in the month")
    else:
        notes.append(f"{invoice.outside} row(s) outside {month} ignored")
    if invoice.byok_rows:
        notes.append(f"{invoice.byok_rows} BYOK row(s) taken at {BYOK_COLUMN}")
    click.echo("; ".join(notes))
    for label, side in (("only in ours", "ONLY OURS"), ("only in the invoice", "ONLY THEIRS")):
        names = [line.model for line in lines if line.status.startswith(side)]
        if names:
            click.echo(f"{label}: {', '.join(names)}")
    if unknown:
        known = ", ".join(unknown)
        click.echo(f"invoice models the price book does not know (matched as written): {known}")
    off = [line.model for line in lines if line.off]
    if off:
        click.echo(f"{len(off)} model(s) off by more than {tolerance}%: {', '.join(off)}")
        sys.exit(1)
    click.echo(f"every model within {tolerance}%")


def _read(path: Path, start: datetime, end: datetime) -> Invoice:
    try:
        with path.open(encoding="utf-8-sig", newline="") as source:
            return read_invoice(source, start, end)
    except OSError as exc:
        raise NoComparison(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise NoComparison(f"{path} is not UTF-8 text (export it as CSV UTF-8)") from None
    except InvoiceError as exc:
        raise NoComparison(f"{path.name}: {exc}") from None


def _our_totals(
    obj: Context, start: datetime, end: datetime, tenant: str | None, provider: str | None
) -> tuple[dict[str, Decimal], str]:
    try:
        url = obj.settings.database_url
    except click.ClickException as exc:
        raise NoComparison(exc.message) from None
    if not url:
        raise NoComparison("set BILLING_DATABASE_URL (the transactions live there)")
    try:
        return asyncio.run(fetch_totals(url, start, end, tenant, provider))
    except ReconcileError as exc:
        raise NoComparison(str(exc)) from None


def _resolver(obj: Context) -> Callable[[str], str | None]:
    try:
        book = obj.book
    except click.ClickException as exc:
        raise NoComparison(exc.message) from None
    return book.resolve


def _print_table(lines: list[Line]) -> None:
    width = max([5, *(len(line.model) for line in lines)])
    click.echo(f"{'model':<{width}} {'ours':>16} {'theirs':>16} {'difference':>16} {'%':>9}")
    for line in lines:
        click.echo(
            f"{line.model:<{width}} {_money(line.ours):>16} {_money(line.theirs):>16}"
            f" {_money(line.difference):>16} {_percent(line.percent):>9}  {line.status}"
        )
    overall = Line(
        "total",
        total(line.ours or ZERO for line in lines),
        total(line.theirs or ZERO for line in lines),
        ZERO,
    )
    click.echo(
        f"{'total':<{width}} {_money(overall.ours):>16} {_money(overall.theirs):>16}"
        f" {_money(overall.difference):>16} {_percent(overall.percent):>9}"
    )


def _money(amount: Decimal | None) -> str:
    """Six places for the table (the comparison itself is exact)."""
    if amount is None:
        return "-"
    try:
        return format(amount.quantize(Decimal("0.000001"), context=ROUNDED), "f")
    except InvalidOperation:  # too large to show with six places: show it whole
        return format(amount, "f")


def _percent(value: Decimal | None) -> str:
    if value is None:
        return "n/a"
    return format(value.quantize(Decimal("0.01"), context=ROUNDED), "+f") + "%"
