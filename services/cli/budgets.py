"""``billing budgets …`` and ``billing balance``: monthly budgets and prepaid balances
(issue #11), in PostgreSQL. The database is found as for ``billing tenants``
(``services.cli.context``); the numbers are those of ``GET /v1/billing/balance``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from services.cli.context import Context
from services.cli.tenants import with_database

if TYPE_CHECKING:
    import asyncpg

BUDGET_ROW = "{:<16}  {:>16}  {:<4}  {}"
MONEY_ROW = "{:<10}  {:>16}"
USAGE_ROW = "{:<16}  {:<7}  {:>16}  {:>16}  {:>16}  {}"


@click.group()
def budgets() -> None:
    """Monthly budgets of a tenant or of one of its API keys (UTC calendar months)."""


@budgets.command("set")
@click.argument("tenant")
@click.option("--monthly-limit", required=True, metavar="USD", help="A decimal such as 100.00.")
@click.option("--key", "key_id", default=None, help="The budget of this API key of TENANT.")
@click.option("--soft", is_flag=True, help="Only alert when it is reached; never refuse.")
@click.option(
    "--alerts",
    default=None,
    metavar="50,80,100",
    help='Alert thresholds in percent of the limit (default 50,80,100; "" for none).',
)
@click.pass_obj
def budgets_set(
    obj: Context,
    tenant: str,
    monthly_limit: str,
    key_id: str | None,
    soft: bool,
    alerts: str | None,
) -> None:
    """Create or replace TENANT's monthly budget (or, with --key, one of its keys')."""
    from services.adapters.quota import BudgetTargetError, set_budget
    from services.core.quota import BudgetError, budget_of

    try:
        budget = budget_of(tenant, monthly_limit, api_key_id=key_id, hard=not soft, alerts=alerts)
    except BudgetError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        with_database(obj, lambda c: set_budget(c, budget))
    except BudgetTargetError as exc:
        raise click.ClickException(str(exc)) from None
    whose = f"key {key_id} of {tenant}" if key_id else tenant
    kind = "soft" if soft else "hard"
    thresholds = ",".join(map(str, budget.alerts)) or "none"
    limit = f"{budget.monthly_limit:f} USD a month"
    click.echo(f"{kind} budget of {limit} set for {whose} (alerts at {thresholds}%)")


@budgets.command("show")
@click.argument("tenant")
@click.option("--json", "as_json", is_flag=True, help="The budgets API's JSON (money as strings).")
@click.pass_obj
def budgets_show(obj: Context, tenant: str, as_json: bool) -> None:
    """TENANT's budgets: its own first, then its keys'."""
    from services.adapters.quota import budgets_of
    from services.core.balances import budget_json

    async def read(connection: asyncpg.Connection) -> list[dict[str, Any]]:
        await _require_tenant(connection, tenant)
        return [budget_json(b) for b in await budgets_of(connection, tenant)]

    found: list[dict[str, Any]] = with_database(obj, read)
    if as_json:
        click.echo(json.dumps({"tenant_id": tenant, "budgets": found}, indent=2))
        return
    if not found:
        click.echo(f"{tenant} has no budgets")
        return
    click.echo(BUDGET_ROW.format("budget", "monthly USD", "kind", "alerts %"))
    for b in found:
        whose = f"key {b['api_key_id']}" if b["api_key_id"] else "tenant"
        kind = "hard" if b["hard"] else "soft"
        thresholds = ",".join(map(str, b["alerts"])) or "-"
        click.echo(BUDGET_ROW.format(whose, b["monthly_limit"], kind, thresholds))


@click.command("balance")
@click.argument("tenant")
@click.option("--key", "key_id", default=None, help="Also show this API key's own budget.")
@click.option("--json", "as_json", is_flag=True, help="The balance API's JSON (money as strings).")
@click.pass_obj
def balance_cmd(obj: Context, tenant: str, key_id: str | None, as_json: bool) -> None:
    """TENANT's prepaid balance, what requests in flight hold, and this month's budgets."""
    from services.adapters.tenants import list_keys
    from services.gateway.quota_api import read_balance

    require_credits = obj.settings.require_credits

    async def read(connection: asyncpg.Connection) -> dict[str, Any]:
        await _require_tenant(connection, tenant)
        if key_id and key_id not in {k.key_id for k in await list_keys(connection, tenant)}:
            raise click.ClickException(f"tenant {tenant!r} has no API key {key_id!r}")
        return await read_balance(
            connection,
            tenant,
            key_id or "",
            require_credits=require_credits,
            now=datetime.now(UTC),
        )

    view: dict[str, Any] = with_database(obj, read)
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    click.echo(MONEY_ROW.format(view["currency"], "amount"))
    for name in ("balance", "reserved", "pending", "available"):
        click.echo(MONEY_ROW.format(name, view[name]))
    budgets_in_use = [("tenant", view["budget"]), (f"key {key_id}", view["key_budget"])]
    rows = [(whose, b) for whose, b in budgets_in_use if b is not None]
    click.echo("")
    if not rows:
        click.echo("no monthly budget")
        return
    click.echo(USAGE_ROW.format("budget", "month", "limit", "spent", "remaining", "kind"))
    for whose, b in rows:
        kind = "hard" if b["hard"] else "soft"
        click.echo(
            USAGE_ROW.format(whose, b["period"], b["limit"], b["spent"], b["remaining"], kind)
        )


async def _require_tenant(connection: asyncpg.Connection, tenant: str) -> None:
    from services.adapters.tenants import tenant_exists

    if "\x00" in tenant or not await tenant_exists(connection, tenant):
        raise click.ClickException(f"no tenant {tenant!r}")
