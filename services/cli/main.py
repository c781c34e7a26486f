"""The ``billing`` command line: the group, ``quote``, ``schemas`` and ``demo``.

The other commands live one module per role and are registered at the bottom: the stack
(``up``, the services, ``migrate``, ``topics``, ``fake-upstream``) in ``stack``, tenants and
keys in ``tenants``, prices in ``prices``, and the jobs in ``reprice``, ``reconcile`` and
``rebuild``.
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import click
import orjson

from services.adapters.paths import DEFAULT_DATA_DIR
from services.cli.budgets import balance_cmd, budgets
from services.cli.context import Context, add_data_dir_option
from services.cli.credits import credits
from services.cli.invoices import invoices
from services.cli.partitions import partitions_cmd
from services.cli.prices import _load_json, prices
from services.cli.rebuild import rebuild_cmd
from services.cli.reconcile import reconcile_cmd
from services.cli.reprice import reprice_cmd
from services.cli.stack import COMMANDS as STACK_COMMANDS
from services.cli.tenants import keys, tenants
from services.core.errors import BillingError
from services.core.pricebook import PriceLookup
from services.core.quote import error_json, quote

# Settings (pydantic), the HTTP client and the web stack are imported by the commands that
# need them: ``billing quote --batch`` starts in a fraction of the time without them.


@click.group()
@click.version_option(package_name="llm-billing", prog_name="billing")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="BILLING_DATA_DIR",
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="Where the price book, database, logs and stack.json live ($BILLING_DATA_DIR); "
    "every command also takes it.",
)
@click.pass_context
def main(ctx: click.Context, data_dir: Path) -> None:
    """Billing for LLM traffic: quotes, prices and the gateway."""
    ctx.obj = Context(data_dir)


# -- quote --------------------------------------------------------------------------------------


@main.command("quote")
@click.option("--model", "-m", help="Model id, e.g. anthropic/claude-sonnet-4.5.")
@click.option("--usage-json", help="Usage object as JSON (any supported shape).")
@click.option("--usage-file", type=click.File("r"), help="File holding the usage JSON.")
@click.option(
    "--format",
    "usage_format",
    type=click.Choice(["openai", "openai_responses", "anthropic", "gemini", "normalised"]),
    help="Wire format of the usage (detected when omitted).",
)
@click.option("--pricing-file", type=click.File("r"), help="Quote against this pricing object.")
@click.option("--at", help="Price as of this RFC 3339 time (default: now).")
@click.option("--batch", is_flag=True, help="Read JSON lines from stdin, write one result each.")
@click.pass_obj
def quote_cmd(
    obj: Context,
    model: str | None,
    usage_json: str | None,
    usage_file: IO[str] | None,
    usage_format: str | None,
    pricing_file: IO[str] | None,
    at: str | None,
    batch: bool,
) -> None:
    """Price a model, or one request's usage, with the same JSON as the quote API."""
    if batch:
        if model or usage_json or usage_file or pricing_file or at or usage_format:
            raise click.UsageError("--batch takes every field from its input lines")
        errors = run_batch(sys.stdin.buffer, sys.stdout.buffer, obj.book)
        if errors:
            click.echo(f"{errors} line(s) had errors", err=True)
        return
    if not model:
        raise click.UsageError("--model is required (or use --batch)")
    if usage_json and usage_file:
        raise click.UsageError("give --usage-json or --usage-file, not both")
    request: dict[str, Any] = {"provider_model_id": model}
    if usage_json is not None:
        request["usage"] = _load_json(usage_json, "--usage-json")
    elif usage_file is not None:
        request["usage"] = _load_json(usage_file.read(), "the usage file")
    if usage_format:
        request["format"] = usage_format
    if pricing_file:
        request["pricing"] = _load_json(pricing_file.read(), "the pricing file")
    if at:
        request["at"] = at
    try:
        click.echo(json.dumps(quote(request, obj.book), indent=2))
    except BillingError as exc:
        click.echo(json.dumps(error_json(exc), indent=2))
        sys.exit(1)


def run_batch(source: IO[bytes], sink: IO[bytes], book: PriceLookup) -> int:
    """Quote every JSON line of ``source`` into ``sink``, in order; return the error count.

    Every input line gets exactly one output line (a blank or broken one gets an error), so
    the n-th answer always belongs to the n-th request.
    """
    errors = 0
    write = sink.write
    for number, line in enumerate(source, start=1):
        try:
            result = quote(json.loads(line, parse_float=Decimal), book)
        except BillingError as exc:
            result = error_json(exc) | {"line": number}
            errors += 1
        except (ValueError, RecursionError) as exc:
            reason = "is empty" if not line.strip() else f"is not valid JSON: {exc}"
            result = {"error": f"line {reason}", "line": number}
            errors += 1
        except Exception as exc:  # one line must never stop the batch
            result = {"error": f"internal error: {exc!r}", "line": number}
            errors += 1
        write(orjson.dumps(result, option=orjson.OPT_APPEND_NEWLINE))
    sink.flush()
    return errors


# -- schemas and demo ----------------------------------------------------------------------------


@main.command("schemas")
@click.option("--check", is_flag=True, help="Exit 1 if the committed schemas are stale.")
def schemas_cmd(check: bool) -> None:
    """Regenerate the events' JSON Schemas in schemas/ from the models."""
    from services.adapters import schemas

    if check:
        stale = [n for n, t in schemas.generate().items() if _read(schemas.SCHEMA_DIR / n) != t]
        if stale:
            raise click.ClickException(f"stale: {', '.join(stale)} (run `billing schemas`)")
        click.echo("schemas are up to date")
        return
    changed = schemas.write()
    click.echo(f"wrote {', '.join(changed)}" if changed else "schemas are up to date")


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


@main.command("demo")
@click.pass_obj
def demo(obj: Context) -> None:
    """Price a handful of real-shaped requests from every supported format and print a table."""
    from services.local.demo import run_demo

    run_demo(obj.book)


for command in (
    *STACK_COMMANDS,
    tenants,
    keys,
    credits,
    budgets,
    invoices,
    balance_cmd,
    prices,
    reprice_cmd,
    reconcile_cmd,
    rebuild_cmd,
    partitions_cmd,
):
    main.add_command(command)
# Every command that reads the data dir takes --data-dir too: `billing up --data-dir D`
# (as the README writes it) and `billing --data-dir D up` both work; the command's wins.
add_data_dir_option(main, skip=frozenset({"schemas", "fake-upstream"}))

if __name__ == "__main__":
    main()
