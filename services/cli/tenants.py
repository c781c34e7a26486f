"""``billing tenants …`` and ``billing keys …``: tenants and their API keys, in PostgreSQL.

The database is ``$BILLING_DATABASE_URL``, else that of the ``billing up`` running on the
data dir (see ``services.cli.context``).
"""

from __future__ import annotations

from typing import Any

import click

from services.adapters.errors import DatabaseError
from services.cli.context import Context, on_database

# The database driver is imported by the commands: ``billing quote --batch`` stays fast.


def with_database(obj: Context, work: Any) -> Any:
    """Run ``work(connection)`` against the configured database (migrated first)."""
    from services.adapters.tenants import TenantError

    url = obj.settings.database_url
    if not url:
        raise click.ClickException(
            "set BILLING_DATABASE_URL, or start `billing up` on this data dir "
            f"({obj.data_dir}): tenants, keys and credits live in its database"
        )

    try:
        return on_database(url, work)
    except (TenantError, DatabaseError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
def tenants() -> None:
    """Tenants (the unit of billing)."""


@tenants.command("create")
@click.argument("tenant_id")
@click.pass_obj
def tenants_create(obj: Context, tenant_id: str) -> None:
    """Create a tenant."""
    from services.adapters.tenants import create_tenant

    with_database(obj, lambda c: create_tenant(c, tenant_id))
    click.echo(f"tenant {tenant_id} created")


@click.group()
def keys() -> None:
    """Tenant API keys (stored as hashes; a key is shown once)."""


@keys.command("create")
@click.option("--tenant", required=True)
@click.option("--name", default="", help="A label for the key.")
@click.pass_obj
def keys_create(obj: Context, tenant: str, name: str) -> None:
    """Create a key and print it (it cannot be shown again)."""
    from services.adapters.tenants import create_key

    key_id, key = with_database(obj, lambda c: create_key(c, tenant, name))
    click.echo(key)
    click.echo(f"key id {key_id} for tenant {tenant}: store the key now, it is not kept", err=True)


KEY_ROW = "{:<12}  {:<20} {:<16} {:<25}  {}"


@keys.command("list")
@click.option("--tenant", default=None)
@click.pass_obj
def keys_list(obj: Context, tenant: str | None) -> None:
    """Keys (never their secrets): id, tenant, name, created, revoked."""
    from services.adapters.tenants import list_keys

    found = with_database(obj, lambda c: list_keys(c, tenant))
    click.echo(KEY_ROW.format("key id", "tenant", "name", "created", "revoked"))
    for key in found:
        revoked = key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "-"
        created = key.created_at.isoformat(timespec="seconds")
        click.echo(KEY_ROW.format(key.key_id, key.tenant_id, key.name, created, revoked))


@keys.command("revoke")
@click.argument("key_id")
@click.pass_obj
def keys_revoke(obj: Context, key_id: str) -> None:
    """Revoke a key (requests with it are refused within seconds)."""
    from services.adapters.tenants import revoke_key

    with_database(obj, lambda c: revoke_key(c, key_id))
    click.echo(f"key {key_id} revoked")
