"""The stack's commands: ``billing up`` (everything, supervised), each service on its own
(``gateway``, ``pricer``, ``projector``), their set-up (``migrate``, ``topics``) and the
``fake-upstream`` for tests and benchmarks. Added to ``main`` in ``services.cli.main``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click

from services.adapters.errors import DatabaseError
from services.cli.context import Context

if TYPE_CHECKING:
    import asyncio

    from services.adapters.settings import Settings

# The web stack, faust, the database driver and the supervisor are imported by the commands
# that need them: ``billing quote --batch`` starts in a fraction of the time without them.


@click.command("up")
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(1, 65533),
    help="Gateway port; the pricer's and projector's metrics take the next two.",
)
@click.option("--demo", "with_demo", is_flag=True, help="Send a burst of usage and print totals.")
@click.option(
    "--broker-storage",
    type=click.Choice(["s3", "memory"]),
    default="s3",
    show_default=True,
    envvar="BILLING_BROKER_STORAGE",
    help="Where the embedded broker keeps its log: s3 (weed mini under <data-dir>/objects, "
    "kept across restarts) or memory (lost when it stops). Unused with BILLING_KAFKA_BOOTSTRAP.",
)
@click.option(
    "--broker-retention",
    default="off",
    show_default=True,
    envvar="BILLING_BROKER_RETENTION",
    callback=lambda _ctx, _param, value: _duration(value),
    help="With s3 storage, delete the log's batches once every service has consumed them "
    "and they are older than this (7d, 12h, 30m); off keeps them all. Tansu slows down as "
    "the log grows, and `billing rebuild` refuses a trimmed log: see the README.",
)
@click.option(
    "--log-max-mb",
    type=click.IntRange(1, 10_000),
    default=10,
    show_default=True,
    envvar="BILLING_LOG_MAX_MB",
    help="Rotate a log of <data-dir>/logs when it grows past this size.",
)
@click.option(
    "--log-backups",
    type=click.IntRange(0, 100),
    default=5,
    show_default=True,
    envvar="BILLING_LOG_BACKUPS",
    help="Rotated copies kept of each log (name.log.1 the newest).",
)
@click.pass_obj
def up_cmd(
    obj: Context,
    port: int,
    with_demo: bool,
    broker_storage: str,
    broker_retention: timedelta | None,
    log_max_mb: int,
    log_backups: int,
) -> None:
    """Start broker and database if missing, then gateway, pricer and projector."""
    from services.local.supervisor import Stack, run

    settings = obj.env_settings  # never another stack's state: this one is the stack
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    after = None
    if with_demo:
        from services.local.demo_pipeline import print_dashboard, run_demo

        def after(stack: Stack) -> None:
            run_demo(stack.url, token, should_stop=lambda: stack.stopping)
            if stack.state is not None and not stack.stopping:
                print_dashboard(stack.url, stack.state.database_url, token, click.echo)

    stack = Stack(
        settings,
        port,
        click.echo,
        broker_storage=broker_storage,
        log_max_bytes=log_max_mb * 1024 * 1024,
        log_backups=log_backups,
        broker_retention=broker_retention,
    )
    run(stack, after)


def _duration(text: str) -> timedelta | None:
    from services.core.periods import parse_grace

    try:
        duration = parse_grace(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if duration is not None and duration < timedelta(minutes=1):
        raise click.BadParameter(f"{text!r}: at least 1m (the log is swept every minute)")
    return duration


@click.command("migrate")
@click.pass_obj
def migrate_cmd(obj: Context) -> None:
    """Apply pending migrations to $BILLING_DATABASE_URL (or the embedded database)."""
    import asyncio

    from services.adapters.database import migrate
    from services.local.postgres import EmbeddedPostgres

    url = obj.settings.database_url
    if url is None:
        url = EmbeddedPostgres(obj.data_dir).start()
    try:
        applied = asyncio.run(migrate(url))
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"applied {', '.join(applied)}" if applied else "database is up to date")


@click.command("topics")
@click.pass_obj
def topics_cmd(obj: Context) -> None:
    """Create the pipeline's topics (explicitly, with $BILLING_PARTITIONS partitions)."""
    import asyncio

    from services.adapters.kafka import ensure_topics
    from services.adapters.topics import Topics

    settings = obj.settings
    if not settings.kafka_bootstrap:
        raise click.ClickException("set BILLING_KAFKA_BOOTSTRAP (or start `billing up`)")
    topics = Topics.named(settings.topic_prefix)
    asyncio.run(ensure_topics(settings.kafka_bootstrap, topics.partitions(settings.partitions)))
    click.echo(f"topics ready: {', '.join(topics)} ({settings.partitions} partitions)")


@click.command("gateway")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="Processes sharing the port (default $BILLING_GATEWAY_WORKERS, else 1).",
)
@click.pass_obj
def gateway_cmd(obj: Context, host: str, port: int, workers: int | None) -> None:
    """Run the gateway HTTP service: the proxies, ingest, quotes and the billing queries."""
    import uvicorn

    from services.gateway.app import create_app
    from services.gateway.server import HeadLimitedProtocol

    settings = obj.settings
    if settings.env == "production" and settings.session_secret is None:
        raise click.ClickException(
            "BILLING_SESSION_SECRET must be set in production: it signs the dashboard's "
            "sessions, and every gateway process and host must share one"
        )
    if settings.admin_token is None and not is_loopback(host):
        # Without the token everything under /internal (usage, credits, prices) is open.
        raise click.ClickException(
            f"refusing to listen on {host}: set BILLING_ADMIN_TOKEN first (without it "
            "/internal is open to anyone who can reach the port); only 127.0.0.1, ::1 "
            "and localhost are allowed without one"
        )
    workers = workers or settings.gateway_workers
    if workers == 1:
        uvicorn.run(
            create_app(settings),
            host=host,
            port=port,
            log_level="info",
            access_log=False,
            http=HeadLimitedProtocol,
        )
        return
    # Each worker is a fresh interpreter that builds its app from the environment: hand it
    # what this process resolved (the data dir, a running stack's addresses, the count).
    os.environ.update(_worker_environment(settings, workers))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_fresh_metrics_dir(settings.data_dir, port))
    uvicorn.run(
        "services.gateway.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=False,
        http=HeadLimitedProtocol,
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``): nothing else can reach it.
    A host name other than ``localhost`` is not trusted to stay one."""
    import ipaddress

    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def _worker_environment(settings: Settings, workers: int) -> dict[str, str]:
    values = {
        "BILLING_DATA_DIR": str(settings.data_dir.resolve()),
        "BILLING_GATEWAY_WORKERS": str(workers),
        "BILLING_TOPIC_PREFIX": settings.topic_prefix,
        "BILLING_SPOOL_DIR": str(settings.usage_spool_dir.resolve()),
    }
    if settings.database_url:
        values["BILLING_DATABASE_URL"] = settings.database_url
    if settings.kafka_bootstrap:
        values["BILLING_KAFKA_BOOTSTRAP"] = settings.kafka_bootstrap
    if settings.session_secret is None:  # one secret for every worker's session cookies
        values["BILLING_SESSION_SECRET"] = secrets.token_urlsafe(32)
    return values


def _fresh_metrics_dir(data_dir: Path, port: int) -> Path:
    """An empty directory for the workers' metric files (stale files would be summed in)."""
    import shutil

    directory = data_dir.resolve() / "metrics" / f"gateway-{port}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


@click.command("pricer")
@click.option("--log-level", default="info", show_default=True)
@click.pass_obj
def pricer_cmd(obj: Context, log_level: str) -> None:
    """Run the pricer (faust worker): billing.usage.v1 → billing.costs.v1."""
    from services.adapters.consuming import PRICER_GROUP
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
        app_id=f"{settings.topic_prefix}{PRICER_GROUP}",  # the group the lag watchers name
    )
    (settings.data_dir / "pricer").mkdir(parents=True, exist_ok=True)
    _serve_metrics(settings)
    run_worker(app, loglevel=log_level)


@click.command("projector")
@click.pass_obj
def projector_cmd(obj: Context) -> None:
    """Run the projector: billing.costs.v1 → PostgreSQL read models, exactly once."""
    import logging

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
        retention_months=settings.retention_months,
        retention_action=settings.retention_action,
        assignment=settings.consumer_assignment,
    )

    _serve_metrics(settings)
    _run_until_signalled(projector.run)


@click.command("quota")
@click.pass_obj
def quota_cmd(obj: Context) -> None:
    """Run the quota service: billing.costs.v1 → balances, budget spend and alerts."""
    import logging

    from services.adapters.topics import Topics
    from services.quota.alerts import Webhook
    from services.quota.service import QuotaService

    settings = obj.settings
    bootstrap, database_url = _require_services(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    webhook = None
    if settings.alert_webhook_url:
        if settings.alert_webhook_secret is None:
            raise click.ClickException(
                "BILLING_ALERT_WEBHOOK_URL needs BILLING_ALERT_WEBHOOK_SECRET (alerts are signed)"
            )
        import httpx

        try:
            scheme = httpx.URL(settings.alert_webhook_url).scheme
        except httpx.InvalidURL as exc:
            raise click.ClickException(f"BILLING_ALERT_WEBHOOK_URL: {exc}") from None
        if scheme not in ("http", "https"):
            raise click.ClickException("BILLING_ALERT_WEBHOOK_URL must be an http(s) URL")
        secret = settings.alert_webhook_secret.get_secret_value()
        webhook = Webhook(settings.alert_webhook_url, secret)
    service = QuotaService(
        bootstrap,
        database_url,
        topics=Topics.named(settings.topic_prefix),
        group=f"{settings.topic_prefix}billing-quota",
        low_fraction=settings.balance_low_fraction,
        webhook=webhook,
        assignment=settings.consumer_assignment,
    )
    _serve_metrics(settings)
    _run_until_signalled(service.run)


def _run_until_signalled(run: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """``run(stop)`` in a new event loop; SIGTERM or SIGINT sets ``stop``."""
    import asyncio
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(stop)

    asyncio.run(main())


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


@click.command("fake-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8090, show_default=True, type=int, help="0: any free port.")
@click.option("--latency-ms", default=0, show_default=True, type=int)
@click.option("--completion-tokens", default=24, show_default=True, type=int)
def fake_upstream_cmd(host: str, port: int, latency_ms: int, completion_tokens: int) -> None:
    """Serve a fake OpenRouter / Gemini upstream (tests and benchmarks; loopback)."""
    import socket

    import uvicorn

    from services.local.fake_upstream import FakeConfig, create_fake_upstream

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets made with it; without it every
    # keep-alive answer after the first waited ~40 ms for a delayed ACK (measured).
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise click.ClickException(
            f"cannot listen on {host}:{port} ({exc.strerror}); choose another with --port"
        ) from None
    listener.listen(128)  # connections wait in the backlog until the server accepts them
    bound = listener.getsockname()[1]
    base = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{bound}"
    click.echo(f"fake upstream at {base}; point the gateway at it with")
    click.echo(f"  export OPENROUTER_BASE_URL={base}/api/v1")
    click.echo(f"  export VERTEX_BASE_URL={base}")
    config = FakeConfig(latency_ms=latency_ms, completion_tokens=completion_tokens)
    server = uvicorn.Server(uvicorn.Config(create_fake_upstream(config), log_level="warning"))
    server.run(sockets=[listener])


COMMANDS = (
    up_cmd,
    gateway_cmd,
    pricer_cmd,
    projector_cmd,
    quota_cmd,
    migrate_cmd,
    topics_cmd,
    fake_upstream_cmd,
)
