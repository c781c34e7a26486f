"""The ``billing`` command line."""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click
import orjson

from services.adapters.errors import DatabaseError
from services.adapters.paths import DEFAULT_DATA_DIR
from services.cli.context import Context
from services.cli.prices import _load_json, prices
from services.cli.rebuild import rebuild_cmd
from services.cli.reconcile import reconcile_cmd
from services.cli.reprice import reprice_cmd
from services.core.errors import BillingError
from services.core.pricebook import PriceLookup
from services.core.quote import error_json, quote

if TYPE_CHECKING:
    from services.adapters.settings import Settings

# Settings (pydantic), the HTTP client and the web stack are imported by the commands that
# need them: ``billing quote --batch`` starts in a fraction of the time without them.


@click.group()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="BILLING_DATA_DIR",
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="Where the price book lives ($BILLING_DATA_DIR).",
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


# -- services -----------------------------------------------------------------------------------


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


@main.command("migrate")
@click.pass_obj
def migrate_cmd(obj: Context) -> None:
    """Apply pending migrations to $BILLING_DATABASE_URL (or the embedded database)."""
    import asyncio

    from services.adapters.database import EmbeddedPostgres, migrate

    url = obj.settings.database_url
    embedded = None
    if url is None:
        embedded = EmbeddedPostgres(obj.data_dir)
        url = embedded.start()
    try:
        applied = asyncio.run(migrate(url))
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"applied {', '.join(applied)}" if applied else "database is up to date")


@main.command("topics")
@click.pass_obj
def topics_cmd(obj: Context) -> None:
    """Create the pipeline's topics (explicitly, with $BILLING_PARTITIONS partitions)."""
    import asyncio

    from services.adapters.kafka import ensure_topics
    from services.adapters.topics import Topics

    settings = obj.settings
    if not settings.kafka_bootstrap:
        raise click.ClickException("set BILLING_KAFKA_BOOTSTRAP")
    topics = Topics.named(settings.topic_prefix)
    asyncio.run(ensure_topics(settings.kafka_bootstrap, topics.partitions(settings.partitions)))
    click.echo(f"topics ready: {', '.join(topics)} ({settings.partitions} partitions)")


@main.command("gateway")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.pass_obj
def gateway_cmd(obj: Context, host: str, port: int) -> None:
    """Run the gateway HTTP service (quote API)."""
    import uvicorn

    from services.gateway.app import create_app

    uvicorn.run(create_app(obj.settings), host=host, port=port, log_level="info")


@main.command("pricer")
@click.option("--log-level", default="info", show_default=True)
@click.pass_obj
def pricer_cmd(obj: Context, log_level: str) -> None:
    """Run the pricer (faust worker): billing.usage.v1 → billing.costs.v1."""
    from services.adapters.topics import Topics
    from services.adapters.wiring import pricing_cache
    from services.pricer.app import build_app, run_worker
    from services.pricer.unpriced import UnpricedStore

    settings = obj.settings
    bootstrap, database_url = _require_services(settings)
    app = build_app(
        bootstrap=bootstrap,
        data_dir=settings.data_dir.resolve() / "pricer",
        topics=Topics.named(settings.topic_prefix),
        prices=pricing_cache(settings),
        unpriced=UnpricedStore(database_url),
        app_id=f"{settings.topic_prefix}billing-pricer",
    )
    (settings.data_dir / "pricer").mkdir(parents=True, exist_ok=True)
    _serve_metrics(settings)
    run_worker(app, loglevel=log_level)


@main.command("projector")
@click.pass_obj
def projector_cmd(obj: Context) -> None:
    """Run the projector: billing.costs.v1 → PostgreSQL read models, exactly once."""
    import asyncio
    import logging
    import signal

    from services.adapters.topics import Topics
    from services.projector.service import Projector

    settings = obj.settings
    bootstrap, database_url = _require_services(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    projector = Projector(
        bootstrap,
        database_url,
        topics=Topics.named(settings.topic_prefix),
        group=f"{settings.topic_prefix}billing-projector",
    )

    _serve_metrics(settings)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await projector.run(stop)

    asyncio.run(run())


def _serve_metrics(settings: Settings) -> None:
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.metrics_host)


def _require_services(settings: Settings) -> tuple[str, str]:
    if not settings.kafka_bootstrap or not settings.database_url:
        raise click.ClickException(
            "set BILLING_KAFKA_BOOTSTRAP and BILLING_DATABASE_URL (or run everything with "
            "`billing up`, which starts what is missing)"
        )
    return settings.kafka_bootstrap, settings.database_url


@main.command("up")
@click.option("--port", default=8080, show_default=True, type=int, help="Gateway port.")
@click.option("--demo", "with_demo", is_flag=True, help="Send a burst of usage and print totals.")
@click.pass_obj
def up_cmd(obj: Context, port: int, with_demo: bool) -> None:
    """Start broker and database if missing, then gateway, pricer and projector."""
    from services.local.supervisor import Stack, run

    settings = obj.settings
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    after = None
    if with_demo:
        from services.local.demo_pipeline import run_demo

        def after(stack: Stack) -> None:
            run_demo(stack.url, token, should_stop=lambda: stack.stopping)

    run(Stack(settings, port, click.echo), after)


def _with_database(obj: Context, work: Any) -> Any:
    """Run ``work(connection)`` against the configured database (migrated first)."""
    import asyncio

    from services.adapters.database import connect, migrate
    from services.adapters.tenants import TenantError

    url = obj.settings.database_url
    if not url:
        raise click.ClickException("set BILLING_DATABASE_URL (tenants and keys live there)")

    async def run() -> Any:
        await migrate(url)
        connection = await connect(url)
        try:
            return await work(connection)
        finally:
            await connection.close()

    try:
        return asyncio.run(run())
    except (TenantError, DatabaseError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.group()
def tenants() -> None:
    """Tenants (the unit of billing)."""


@tenants.command("create")
@click.argument("tenant_id")
@click.pass_obj
def tenants_create(obj: Context, tenant_id: str) -> None:
    """Create a tenant."""
    from services.adapters.tenants import create_tenant

    _with_database(obj, lambda c: create_tenant(c, tenant_id))
    click.echo(f"tenant {tenant_id} created")


@main.group()
def keys() -> None:
    """Tenant API keys (stored as hashes; a key is shown once)."""


@keys.command("create")
@click.option("--tenant", required=True)
@click.option("--name", default="", help="A label for the key.")
@click.pass_obj
def keys_create(obj: Context, tenant: str, name: str) -> None:
    """Create a key and print it (it cannot be shown again)."""
    from services.adapters.tenants import create_key

    key_id, key = _with_database(obj, lambda c: create_key(c, tenant, name))
    click.echo(key)
    click.echo(f"key id {key_id} for tenant {tenant}: store the key now, it is not kept", err=True)


@keys.command("list")
@click.option("--tenant", default=None)
@click.pass_obj
def keys_list(obj: Context, tenant: str | None) -> None:
    """Keys (never their secrets): id, tenant, name, created, revoked."""
    from services.adapters.tenants import list_keys

    for key in _with_database(obj, lambda c: list_keys(c, tenant)):
        revoked = key.revoked_at.isoformat() if key.revoked_at else "-"
        click.echo(
            f"{key.key_id}  {key.tenant_id:<20} {key.name:<16} "
            f"{key.created_at.isoformat()}  revoked {revoked}"
        )


@keys.command("revoke")
@click.argument("key_id")
@click.pass_obj
def keys_revoke(obj: Context, key_id: str) -> None:
    """Revoke a key (requests with it are refused within seconds)."""
    from services.adapters.tenants import revoke_key

    _with_database(obj, lambda c: revoke_key(c, key_id))
    click.echo(f"key {key_id} revoked")


@main.command("fake-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8090, show_default=True, type=int)
@click.option("--latency-ms", default=0, show_default=True, type=int)
@click.option("--completion-tokens", default=24, show_default=True, type=int)
def fake_upstream_cmd(host: str, port: int, latency_ms: int, completion_tokens: int) -> None:
    """Serve a fake OpenRouter / Gemini upstream (tests and benchmarks; loopback)."""
    import uvicorn

    from services.local.fake_upstream import FakeConfig, create_fake_upstream

    config = FakeConfig(latency_ms=latency_ms, completion_tokens=completion_tokens)
    uvicorn.run(create_fake_upstream(config), host=host, port=port, log_level="warning")


@main.command("demo")
@click.pass_obj
def demo(obj: Context) -> None:
    """Price a handful of real-shaped requests from every supported format and print a table."""
    from services.local.demo import run_demo

    run_demo(obj.book)


for command in (prices, reprice_cmd, reconcile_cmd, rebuild_cmd):
    main.add_command(command)

if __name__ == "__main__":
    main()
