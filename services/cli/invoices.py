"""``billing invoices …``: close a month and read the invoices it issued (issue #12).

The database is found as for ``billing tenants`` (``services.cli.context``)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import click

from services.cli.context import Context
from services.cli.tenants import with_database

INVOICE_ROW = "{:<22}  {:<20}  {:<7}  {:>16}  {:>16}  {:>12}"


def _month(text: str | None) -> date | None:
    from services.core.reconciliation import parse_month

    if text is None:
        return None
    try:
        start, _ = parse_month(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--month") from None
    return start.date()


@click.group()
def invoices() -> None:
    """Monthly invoices: issued once per tenant and closed month, never changed."""


@invoices.command("close")
@click.option("--month", "month_text", required=True, help="The UTC month to close: YYYY-MM.")
@click.option("--tenant", default=None, help="Only this tenant (default: every tenant).")
@click.option(
    "--allow-unpriced",
    is_flag=True,
    help="Close even with usage of the month held unpriced (billed later as an adjustment).",
)
@click.pass_obj
def invoices_close(obj: Context, month_text: str, tenant: str | None, allow_unpriced: bool) -> None:
    """Close MONTH: issue each tenant's invoice for it (again: nothing new is issued)."""
    from services.jobs.invoicing import CloseError, close_month

    month = _month(month_text)
    assert month is not None  # noqa: S101 - required option
    try:
        report = with_database(
            obj,
            lambda c: close_month(
                c,
                month,
                now=datetime.now(UTC),
                tenant_id=tenant,
                allow_unpriced=allow_unpriced,
                issuer=obj.settings.invoice_issuer,
            ),
        )
    except CloseError as exc:
        _publish(obj)  # what earlier closes issued goes out even when this one is refused
        raise click.ClickException(str(exc)) from None
    for model, count in report.unpriced.items():
        click.echo(f"warning: {count} requests of {model} still unpriced in {month_text}", err=True)
    if report.issued:
        click.echo(f"closed {month_text}: issued {', '.join(report.issued)}")
    else:
        click.echo(f"closed {month_text}: nothing new to issue")
    _publish(obj)


def _publish(obj: Context) -> None:
    """InvoiceIssued for every invoice not yet on billing.invoices.v1 (a broker configured)."""
    from aiokafka.errors import KafkaError

    from services.adapters.topics import Topics
    from services.jobs.invoicing import publish_issued

    bootstrap = obj.settings.kafka_bootstrap
    if not bootstrap:
        click.echo("no broker configured: InvoiceIssued not published yet", err=True)
        return
    topic = Topics.named(obj.settings.topic_prefix).invoices
    try:
        sent = with_database(obj, lambda c: publish_issued(c, bootstrap, topic))
    except (KafkaError, OSError) as exc:
        click.echo(f"InvoiceIssued not published ({exc!r}); the next close sends it", err=True)
        return
    if sent:
        click.echo(f"published {sent} InvoiceIssued to {topic}", err=True)


@invoices.command("list")
@click.option("--tenant", default=None)
@click.option("--month", "month_text", default=None, help="YYYY-MM")
@click.option("--json", "as_json", is_flag=True, help="One JSON array (money as strings).")
@click.pass_obj
def invoices_list(obj: Context, tenant: str | None, month_text: str | None, as_json: bool) -> None:
    """The issued invoices, in number order."""
    from services.adapters.invoices import list_invoices

    month = _month(month_text)
    shown: list[dict[str, Any]] = with_database(obj, lambda c: list_invoices(c, tenant, month))
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    click.echo(INVOICE_ROW.format("number", "tenant", "period", "subtotal", "credits", "due"))
    for r in shown:
        click.echo(
            INVOICE_ROW.format(
                r["number"],
                r["tenant_id"],
                r["period"],
                r["subtotal"],
                r["credits_applied"],
                r["amount_due"],
            )
        )


@invoices.command("show")
@click.argument("number")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "html", "pdf"]),
    default="json",
    show_default=True,
    help="json: the issued document byte for byte; html, pdf: rendered from it.",
)
@click.option("-o", "output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.pass_obj
def invoices_show(obj: Context, number: str, fmt: str, output: Path | None) -> None:
    """Invoice NUMBER as issued: the JSON document byte for byte, or that document rendered
    as an HTML page or a PDF (``--format pdf`` writes to a file with -o, or to a pipe)."""
    from services.adapters.invoices import invoice_document

    stdout = click.get_binary_stream("stdout")
    if fmt == "pdf" and output is None and stdout.isatty():
        raise click.UsageError("a PDF is binary: write it to a file with -o FILE (or a pipe)")
    document = with_database(obj, lambda c: invoice_document(c, number))
    if document is None:
        raise click.ClickException(f"no invoice {number!r}")
    if fmt == "json":
        data = document.encode()
    else:
        from services.adapters.invoice_documents import render_html, render_pdf

        parsed = json.loads(document)
        data = render_pdf(parsed) if fmt == "pdf" else render_html(parsed).encode()
    if output is not None:
        output.write_bytes(data)
        click.echo(f"wrote {output}", err=True)
    else:
        stdout.write(data)
        stdout.flush()
