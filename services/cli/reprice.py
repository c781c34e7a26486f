"""``billing reprice``: re-rate a window of usage under the current price book."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from services.adapters.errors import AdapterError
from services.cli.context import Context
from services.core.errors import BillingError
from services.core.quote import parse_time


@click.command("reprice")
@click.option("--since", required=True, help="RFC 3339: re-rate usage that occurred from then…")
@click.option("--until", required=True, help="…until then (exclusive).")
@click.option("--model", help="Only requests priced as this model.")
@click.option("--tenant", help="Only this tenant's requests.")
@click.option("--dry-run", is_flag=True, help="Emit nothing; print (or --out) the diff.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the diff there: .json (whole report) or .csv.",
)
@click.option(
    "--source",
    type=click.Choice(["db", "kafka"]),
    default="db",
    show_default=True,
    help="Read the usage facts from PostgreSQL or from the usage topic.",
)
@click.option("--reason", default="price correction", show_default=True, help="For the audit.")
@click.option(
    "--wait",
    "wait_seconds",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds to wait for the projector to apply the revisions (0: do not wait).",
)
@click.pass_obj
def reprice_cmd(
    obj: Context,
    since: str,
    until: str,
    model: str | None,
    tenant: str | None,
    dry_run: bool,
    out: Path | None,
    source: str,
    reason: str,
    wait_seconds: float,
) -> None:
    """Re-rate the usage of [--since, --until) at the prices now in effect for its time.

    Every request whose cost changes gets a new revision on the cost topic (with its
    previous total and delta); the projector moves the transaction and the summary and
    books an adjustment. Running it again changes nothing.
    """
    import asyncio

    from services.adapters.topics import Topics
    from services.core.rerating import Window
    from services.jobs.reprice import Broker, reprice
    from services.jobs.reprice_sources import count_in_db

    settings = obj.settings
    if not settings.database_url:
        raise click.ClickException("set BILLING_DATABASE_URL (the facts and read models)")
    try:
        window = Window(
            parse_time(since, "--since"),
            parse_time(until, "--until"),
            (obj.book.resolve(model) or model) if model else None,
            tenant,
        )
    except (BillingError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from None
    obj.book.reload()  # the newest corrections, whoever recorded them
    topics = Topics.named(settings.topic_prefix)
    broker = (
        Broker(settings.kafka_bootstrap, topics.usage, topics.costs)
        if settings.kafka_bootstrap
        else None
    )
    url = settings.database_url

    async def run() -> Any:
        from services.adapters.database import connection_to

        total = None
        if source == "db" and sys.stderr.isatty():
            async with connection_to(url) as connection:
                total = await count_in_db(connection, window)
        with _progress(total, "re-rating") as bar:
            return await reprice(
                url,
                obj.book,
                window,
                reason=reason,
                broker=broker,
                dry_run=dry_run,
                source=source,  # type: ignore[arg-type]  # click.Choice
                wait_seconds=wait_seconds or None,
                progress=bar,
                applied_progress=_applied if sys.stderr.isatty() else None,
            )

    try:
        report = asyncio.run(run())
    except AdapterError as exc:  # the database, or the broker not acknowledging
        raise click.ClickException(str(exc)) from exc
    for row in report.rows():
        click.echo(
            f"{row['tenant_id']:<24} {row['model']:<40} {row['requests_changed']:>9} "
            f"{row['old_total']:>16} {row['new_total']:>16} {row['delta']:>16}"
        )
    summary = {k: v for k, v in report.to_json().items() if k != "diff"}
    click.echo(json.dumps(summary | {"dry_run": dry_run}))
    if out is not None:
        out.write_text(report.render(out.suffix))
    if not dry_run and report.applied is not None and report.applied < report.emitted:
        click.echo(
            f"the projector applied {report.applied} of {report.emitted} revisions within "
            f"{wait_seconds:g}s; they will land when it catches up",
            err=True,
        )
        sys.exit(3)


@contextlib.contextmanager
def _progress(total: int | None, label: str) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr when it is a terminal and the total is known."""
    if total is None or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


def _applied(applied: int, expected: int) -> None:
    click.echo(f"\rapplied by the projector: {applied}/{expected}", err=True, nl=False)
    if applied >= expected:
        click.echo(err=True)
