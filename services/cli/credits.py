"""``billing credits …``: prepaid credit grants (issue #11), in PostgreSQL's append-only
ledger. The database is found as for ``billing tenants`` (``services.cli.context``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import click

from services.cli.context import Context
from services.cli.tenants import with_database

GRANT_ROW = "{:>8}  {:>16}  {:<20}  {:<20}  {:<24}  {}"


@click.group()
def credits() -> None:
    """Prepaid credits: grants to a tenant's balance (never changed once recorded)."""


@credits.command("add")
@click.argument("tenant")
@click.argument("amount")
@click.option("--reason", required=True, help="Why (a top-up, a promotion, …); recorded.")
@click.option(
    "--idempotency-key",
    default=None,
    help="Recorded once per tenant: a retry with the same key and grant changes nothing.",
)
@click.option("--expires-at", default=None, help="RFC 3339 time after which it cannot be spent.")
@click.pass_obj
def credits_add(
    obj: Context,
    tenant: str,
    amount: str,
    reason: str,
    idempotency_key: str | None,
    expires_at: str | None,
) -> None:
    """Grant AMOUNT USD (a decimal such as 25.00) to TENANT."""
    from services.adapters.credits import LedgerError, add_grant
    from services.core.credits import CreditError, grant_of

    try:
        grant = grant_of(tenant, amount, reason, idempotency_key, expires_at, now=datetime.now(UTC))
    except CreditError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        recorded, new = with_database(obj, lambda c: add_grant(c, grant))
    except LedgerError as exc:
        raise click.ClickException(str(exc)) from None
    what = "granted" if new else "already granted (same idempotency key), unchanged:"
    click.echo(f"{what} {recorded['amount']} USD to {tenant} (grant {recorded['grant_id']})")


@credits.command("list")
@click.argument("tenant")
@click.option("--json", "as_json", is_flag=True, help="One JSON array (money as strings).")
@click.pass_obj
def credits_list(obj: Context, tenant: str, as_json: bool) -> None:
    """TENANT's grants, oldest first."""
    from services.adapters.credits import list_grants

    grants: list[dict[str, Any]] = with_database(obj, lambda c: list_grants(c, tenant))
    if as_json:
        click.echo(json.dumps(grants, indent=2))
        return
    click.echo(GRANT_ROW.format("grant", "amount USD", "granted", "expires", "key", "reason"))
    for g in grants:
        granted = (g["granted_at"] or "")[:19]
        expires = (g["expires_at"] or "-")[:19]
        key = g["idempotency_key"] or "-"
        click.echo(GRANT_ROW.format(g["grant_id"], g["amount"], granted, expires, key, g["reason"]))
