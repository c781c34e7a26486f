"""``billing rebuild``: the command around :func:`services.jobs.rebuild.rebuild`."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from services.cli.context import Context, on_database
from services.jobs.rebuild import RebuildReport, rebuild
from services.jobs.rebuild_tables import RebuildError


class _Bar:
    """A click progress bar on stderr, its length the estimate given so far."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, advanced: int, total: int | None) -> None:
        if self.bar is None:
            self.bar = click.progressbar(
                length=total or 1, label="reading the cost topic", show_pos=True, file=sys.stderr
            )
            self.bar.__enter__()
        self.bar.length = max(total or 0, self.bar.pos + advanced, 1)
        self.bar.update(advanced)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@click.command("rebuild")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Build and compare with the live tables; swap nothing (exit 1 if they differ).",
)
@click.option(
    "--keep-old", is_flag=True, help="Keep the replaced tables as <name>_before_rebuild_<time>."
)
@click.option(
    "--idle-seconds",
    type=float,
    default=3.0,
    show_default=True,
    help="With no projector offsets yet: the log has ended after this long without a record.",
)
@click.option(
    "--lock-timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds the swap waits for readers of the tables before giving up (no change).",
)
@click.pass_obj
def rebuild_cmd(
    obj: Context, dry_run: bool, keep_old: bool, idle_seconds: float, lock_timeout: float
) -> None:
    """Re-derive billing_transactions, tenant_billing_summary and billing_spend_minutes.

    Reads billing.costs.v1 from the start up to the projector's committed offsets, folds it
    into fresh tables and swaps them in atomically (or, with --dry-run, only compares).
    Exit status: 0 done (or equal), 1 the dry run found differences, 2 refused or failed.
    """
    import asyncpg
    from aiokafka.errors import KafkaError

    from services.adapters.errors import DatabaseError
    from services.adapters.topics import Topics

    settings = obj.settings
    if not settings.kafka_bootstrap or not settings.database_url:
        raise click.ClickException("set BILLING_KAFKA_BOOTSTRAP and BILLING_DATABASE_URL")
    bootstrap, url = settings.kafka_bootstrap, settings.database_url
    topic = Topics.named(settings.topic_prefix).costs
    bar = _Bar() if sys.stderr.isatty() else None

    async def run(connection: asyncpg.Connection) -> RebuildReport:
        return await rebuild(
            bootstrap,
            connection,
            topic,
            dry_run=dry_run,
            keep_old=keep_old,
            idle_seconds=idle_seconds,
            lock_timeout=lock_timeout,
            progress=bar,
        )

    try:
        report = on_database(url, run, codecs=True)
    except (
        RebuildError,
        DatabaseError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        KafkaError,
        OSError,
    ) as exc:
        failure = click.ClickException(f"rebuild failed, nothing swapped: {exc}")
        failure.exit_code = 2
        raise failure from exc
    finally:
        if bar is not None:
            bar.close()
    for diff in report.diffs:
        for line in diff.lines():
            click.echo(line)
    click.echo(json.dumps(report.to_json()))
    if dry_run and not report.equal:
        sys.exit(1)
