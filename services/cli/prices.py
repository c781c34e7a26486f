"""``billing prices …``: recording and inspecting prices.

The group (sync, override, set, history, list, show) records and reads price versions in
the price book (``billing reprice``, in ``services.cli.reprice``, applies them to past
usage). ``services.cli.main`` adds it and also uses ``_load_json`` from here for
``billing quote``.
"""

from __future__ import annotations

import getpass
import json
import sys
from datetime import UTC, datetime
from decimal import Decimal
from typing import IO, TYPE_CHECKING, Any

import click

from services.adapters.errors import CatalogueUnavailable
from services.core.corrections import parse_changes, record_correction
from services.core.errors import BillingError
from services.core.money import fmt, product
from services.core.pricebook import prices_in_effect
from services.core.pricing import parse_pricing
from services.core.quote import error_json, parse_time

if TYPE_CHECKING:
    from services.cli.context import Context

# The CLI imports this module whenever it starts: the catalogue client, the database and the
# broker are imported by the commands that need them (``billing quote --batch`` stays fast).


def _load_json(text: str, what: str) -> Any:
    """JSON given on the command line, numbers as ``Decimal``; bad JSON is a usage error."""
    try:
        return json.loads(text, parse_float=Decimal)
    except ValueError as exc:
        raise click.BadParameter(f"{what} is not valid JSON: {exc}") from None


@click.group()
def prices() -> None:
    """Inspect and update the price book."""


@prices.command("sync")
@click.option(
    "--file",
    "file_",
    type=click.File("r"),
    help="Import a saved /models response instead of fetching the live catalogue.",
)
@click.pass_obj
def prices_sync(obj: Context, file_: IO[str] | None) -> None:
    """Fetch OpenRouter's catalogue and record every changed price as a new version."""
    from services.adapters.pricing_cache import sync_catalogue
    from services.adapters.wiring import openrouter_catalogue

    settings = obj.settings
    try:
        if file_ is not None:
            document, source = _load_json(file_.read(), "the catalogue file"), "file"
        else:
            document, source = openrouter_catalogue(settings).fetch_sync(), "openrouter"
        report = sync_catalogue(obj.book, document, source=source)
    except CatalogueUnavailable as exc:
        raise click.ClickException(
            f"{exc} (prices unchanged; try --file for offline import)"
        ) from exc
    click.echo(json.dumps(report.to_json() | {"skipped": len(report.skipped)}))
    for model, reason in report.skipped:
        click.echo(f"skipped {model}: {reason}", err=True)


@prices.command("override")
@click.argument("model")
@click.option(
    "--pricing-file", type=click.File("r"), required=True, help="OpenRouter pricing object."
)
@click.option("--effective-from", required=True, help="RFC 3339 time the price applies from.")
@click.option("--reason", required=True, help="Why (kept with the version for the audit trail).")
@click.pass_obj
def prices_override(
    obj: Context, model: str, pricing_file: IO[str], effective_from: str, reason: str
) -> None:
    """Record a custom or negotiated price for MODEL; it wins over the catalogue from then on."""
    try:
        pricing = parse_pricing(_load_json(pricing_file.read(), "the pricing file"), model)
        version = obj.book.record(
            obj.book.resolve(model) or model,
            pricing,
            effective_from=_cli_time(effective_from),
            layer="override",
            source="override",
            reason=reason,
        )
    except BillingError as exc:
        click.echo(json.dumps(error_json(exc), indent=2))
        sys.exit(1)
    if version is None:
        click.echo("unchanged: that override is already in effect", err=True)
        return
    click.echo(json.dumps(version.to_json(), indent=2))


@prices.command("set")
@click.argument("model")
@click.option("--prompt", help="USD per prompt token (with --per-million: per million).")
@click.option("--completion", help="USD per completion token.")
@click.option("--input-cache-read", help="USD per cached prompt token read.")
@click.option("--input-cache-write", help="USD per prompt token written to the cache.")
@click.option("--per-million", is_flag=True, help="The prices above are USD per million tokens.")
@click.option("--effective-from", required=True, help="RFC 3339 time it applies from.")
@click.option("--reason", required=True, help="Why (kept with the version: the audit trail).")
@click.option("--by", default=lambda: _who(), help="Who (default: the login name).")
@click.option(
    "--layer",
    type=click.Choice(["override", "catalogue"]),
    default="override",
    show_default=True,
    help="override: pins the price until the next correction (negotiated prices); "
    "catalogue: mends the catalogue's history, superseded by its next change.",
)
@click.pass_obj
def prices_set(
    obj: Context,
    model: str,
    prompt: str | None,
    completion: str | None,
    input_cache_read: str | None,
    input_cache_write: str | None,
    per_million: bool,
    effective_from: str,
    reason: str,
    by: str,
    layer: str,
) -> None:
    """Correct MODEL's price from a past or future time: a new version, nothing overwritten.

    The prices given replace those of the version in effect then; the others carry over.
    `billing reprice` then re-rates the usage it covers.
    """
    raw = {
        "prompt": prompt,
        "completion": completion,
        "input_cache_read": input_cache_read,
        "input_cache_write": input_cache_write,
    }
    try:
        changes = parse_changes(raw, per_million=per_million)
        version, base = record_correction(
            obj.book,
            model,
            changes,
            effective_from=_cli_time(effective_from),
            reason=reason,
            by=by,
            layer=layer,  # type: ignore[arg-type]  # click.Choice
        )
    except BillingError as exc:
        click.echo(json.dumps(error_json(exc), indent=2))
        sys.exit(1)
    if version is None:
        click.echo("unchanged: that price is already in effect", err=True)
        return
    click.echo(
        json.dumps(version.to_json() | {"replaces_version": base and base.version}, indent=2)
    )


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        return ""


@prices.command("history")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@click.pass_obj
def prices_history(obj: Context, model: str, as_json: bool) -> None:
    """Every version MODEL's price has had: when it applies, who recorded it, why."""
    versions = sorted(obj.book.history(model), key=lambda v: v.version)
    if not versions:
        click.echo(f"no price has ever been recorded for {model}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps([v.to_json() for v in versions], indent=2))
        return
    million = Decimal(1_000_000)
    click.echo(
        f"{'version':>7} {'layer':<9} {'effective from':<25} {'$/M in':>9} {'$/M out':>9} "
        f"{'recorded at':<25} {'source':<24} reason"
    )
    for v in versions:
        p = v.pricing
        click.echo(
            f"{v.version:>7} {v.layer:<9} {v.effective_from_iso:<25} "
            f"{fmt(product(p.prompt, million)):>9} {fmt(product(p.completion, million)):>9} "
            f"{v.recorded_at.isoformat(timespec='seconds'):<25} {v.source:<24} {v.reason}"
        )


@prices.command("list")
@click.option("--at", help="Prices in effect at this RFC 3339 time (default: now).")
@click.pass_obj
def prices_list(obj: Context, at: str | None) -> None:
    """One line per model: id, prompt and completion $/M tokens, version, since."""
    when = _cli_time(at)
    million = Decimal(1_000_000)
    click.echo(f"{'model':<48} {'$/M in':>10} {'$/M out':>10} {'version':>8}  effective from")
    for v in prices_in_effect(obj.book, when):
        per_m_in, per_m_out = (
            fmt(product(v.pricing.prompt, million)),
            fmt(product(v.pricing.completion, million)),
        )
        click.echo(
            f"{v.model:<48} {per_m_in:>10} {per_m_out:>10} "
            f"{v.version:>8}  {v.effective_from.isoformat()}"
        )


@prices.command("show")
@click.argument("model")
@click.option("--at", help="The version in effect at this RFC 3339 time (default: now).")
@click.pass_obj
def prices_show(obj: Context, model: str, at: str | None) -> None:
    """The price in effect for MODEL, and every version it has had."""
    try:
        current = obj.book.lookup(model, _cli_time(at))
    except BillingError as exc:
        click.echo(json.dumps(error_json(exc), indent=2))
        sys.exit(1)
    document = current.to_json() | {
        "history": [v.to_json() for v in obj.book.history(current.model)]
    }
    click.echo(json.dumps(document, indent=2))


def _cli_time(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        return parse_time(value, "--at")
    except BillingError as exc:
        raise click.BadParameter(str(exc)) from None
