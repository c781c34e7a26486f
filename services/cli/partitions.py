"""``billing partitions``: the monthly partitions of ``billing_transactions`` and the
months retired by ``BILLING_RETENTION_MONTHS`` (``services.adapters.partitions``)."""

from __future__ import annotations

import json
from typing import Any

import click

from services.adapters.errors import DatabaseError
from services.cli.context import Context, on_database


@click.command("partitions")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def partitions_cmd(obj: Context, as_json: bool) -> None:
    """List billing_transactions' monthly partitions (rows, size) and the retired months.

    Row counts are PostgreSQL's estimates (exact after ANALYZE): counting billions of rows
    exactly would scan every partition. Partitions are created ahead and retired by the
    projector (BILLING_RETENTION_MONTHS, BILLING_RETENTION_ACTION).
    """
    import asyncpg

    from services.adapters.partitions import TABLE, retired_months

    url = obj.settings.database_url
    if not url:
        raise click.ClickException(
            f"set BILLING_DATABASE_URL, or start `billing up` on this data dir ({obj.data_dir})"
        )

    async def work(connection: asyncpg.Connection) -> dict[str, Any]:
        rows = await connection.fetch(
            "SELECT c.relname AS partition, pg_get_expr(c.relpartbound, c.oid) AS bounds,"
            " greatest(c.reltuples, 0)::bigint AS rows_estimate,"
            " pg_total_relation_size(c.oid) AS bytes"
            " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = $1::regclass ORDER BY c.relname",
            TABLE,
        )
        retired = await retired_months(connection)
        return {
            "partitions": [dict(r) for r in rows],
            "retired": [
                {
                    "month": r.month.isoformat()[:7],
                    "transactions": r.transactions,
                    "total_cost": str(r.total_cost),
                    "action": r.action,
                    "partition": r.partition,
                    "retired_at": r.retired_at.isoformat(),
                }
                for r in retired
            ],
        }

    try:
        found = on_database(url, work)
    except (DatabaseError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(f"{'partition':<32} {'rows (est.)':>14} {'size':>10}  bounds")
    for p in found["partitions"]:
        size = f"{p['bytes'] / (1 << 20):.1f} MiB"
        click.echo(f"{p['partition']:<32} {p['rows_estimate']:>14,} {size:>10}  {p['bounds']}")
    for r in found["retired"]:
        click.echo(
            f"retired {r['month']}: {r['transactions']:,} transactions, total {r['total_cost']}"
            f" ({r['action']}ed {r['retired_at'][:19]}; {r['partition']})"
        )
