"""Settings, read once from the environment (``BILLING_*``, plus ``OPENROUTER_*``)."""

from __future__ import annotations

import hmac
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.adapters.errors import ConfigError
from services.adapters.paths import DEFAULT_DATA_DIR, price_book_path
from services.core.periods import parse_grace

PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "secret", "admin", "token", "xxx"})


S3_FETCH_MAX_WAIT_MS = 500
"""``kafka_fetch_max_wait_ms`` on ``billing up``'s s3 log, for its services and for the
commands run against it: each fetch there first lists the partition's batches
(``adapters/kafka.py``)."""


class Settings(BaseSettings):
    """Gateway and CLI settings; defaults work on a laptop with no network."""

    model_config = SettingsConfigDict(env_prefix="BILLING_", frozen=True, extra="ignore")

    env: Literal["development", "production"] = "development"
    data_dir: Path = DEFAULT_DATA_DIR
    admin_token: SecretStr | None = None
    """When set, ``/internal/*`` requires ``Authorization: Bearer <token>``."""
    openrouter_base_url: str = Field(
        default="https://openrouter.ai/api/v1",
        validation_alias=AliasChoices("OPENROUTER_BASE_URL", "BILLING_OPENROUTER_BASE_URL"),
    )
    openrouter_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENROUTER_API_KEY", "BILLING_OPENROUTER_API_KEY"),
    )
    database_url: str | None = None
    """PostgreSQL to use (``BILLING_DATABASE_URL``); unset: an embedded server in data_dir."""
    kafka_bootstrap: str | None = None
    """Kafka-protocol broker (``BILLING_KAFKA_BOOTSTRAP``); unset: an embedded Tansu broker."""
    metrics_host: str = "127.0.0.1"
    """Address the pricer's and projector's metrics listen on (0.0.0.0 in containers)."""
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """Pricer and projector serve Prometheus metrics on this port when set (the gateway
    serves them on its own port at /metrics)."""
    topic_prefix: str = ""
    """Prepended to every topic name (keeps pipelines apart on one broker)."""
    partitions: int = Field(default=6, ge=1, le=1000)
    pricer_processes: int = Field(default=1, ge=1, le=64)
    """How many pricer processes ``billing up`` runs (one consumer group: they share the
    usage topic's partitions, so more than ``partitions`` would leave some idle)."""
    publish_timeout_seconds: float = Field(default=10.0, gt=0)
    """How long ingest waits for the broker's acknowledgement before answering 503."""
    upstream_timeout_seconds: float = Field(default=120.0, gt=0)
    """How long the proxy waits on the LLM upstream (long generations take minutes)."""
    gateway_workers: int = Field(default=1, ge=1, le=64)
    """Gateway processes sharing its port (``billing gateway --workers``; ``billing up``
    passes it on). Each worker takes its own spool directory (below ``spool_dir``) and,
    with more than one, metrics are gathered across them (Prometheus multiprocess mode)."""
    max_in_flight: int = Field(default=512, ge=1)
    """Proxied requests one gateway process serves at once; beyond it new ones get 503 at
    once (overload is refused, not queued until everything is slow). Also the size of the
    upstream connection pool."""
    emit_usage: bool = True
    """The proxy emits a ``UsageRecorded`` for every answered request (off: benchmarks only)."""
    spool_dir: Path | None = None
    """Where usage waits, fsync'd, while the broker is away (unset: ``data_dir/spool``)."""
    spool_max_bytes: int = Field(default=1 << 30, ge=1)
    """Past this many spooled bytes the proxy stops taking requests (see spool_full_policy)."""
    spool_full_policy: Literal["reject", "accept"] = "reject"
    """``reject``: 503 new proxy requests while the spool is over its limit (fail closed);
    ``accept``: keep serving and keep spooling (fail open: the disk is the limit)."""
    vertex_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("VERTEX_BASE_URL", "BILLING_VERTEX_BASE_URL")
    )
    """Gemini/Vertex endpoint; unset: derived from VERTEX_PROJECT and VERTEX_REGION."""
    vertex_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("VERTEX_API_KEY", "BILLING_VERTEX_API_KEY")
    )
    vertex_project: str | None = Field(
        default=None, validation_alias=AliasChoices("VERTEX_PROJECT", "BILLING_VERTEX_PROJECT")
    )
    vertex_region: str = Field(
        default="us-central1",
        validation_alias=AliasChoices("VERTEX_REGION", "BILLING_VERTEX_REGION"),
    )
    unknown_tenants: Literal["create", "reject"] = "create"
    """Usage ingested for a tenant id that is not a tenant: ``create`` makes it one
    (counted in ``billing_tenants_created_total``: a typo shows there), ``reject`` refuses
    the item with an error naming the tenant. Needs a database; without one, usage is
    taken as reported."""
    retention_months: int | None = Field(default=None, ge=1, le=1200)
    """Keep this many full months of ``billing_transactions`` before the current one; the
    projector retires older months (their partitions detached or dropped, see
    retention_action). Unset: keep everything. The summary and the log keep the totals."""
    retention_action: Literal["detach", "drop"] = "detach"
    """``detach``: a retired month's partition stays as a plain table for archiving;
    ``drop``: it is deleted."""
    catalogue_sync: bool = True
    """Refresh prices from the live catalogue in the background (off: snapshot and book only)."""
    catalogue_ttl_seconds: float = Field(default=900.0, gt=0)
    catalogue_timeout_seconds: float = Field(default=10.0, gt=0)
    catalogue_retry_seconds: float = Field(default=60.0, gt=0)
    """After a failed refresh, wait this long before trying again (not on every request)."""

    require_credits: bool = False
    """``true``: every tenant is prepaid — one without credits is refused (402). ``false``: a
    tenant with no grants and no hard budget is unlimited (postpaid)."""
    default_max_tokens: int = Field(default=4096, ge=1, le=10_000_000)
    """Completion tokens a reservation assumes when a request sets no ``max_tokens`` (or
    ``max_completion_tokens`` / ``maxOutputTokens``)."""
    model_max_tokens: dict[str, int] = Field(default_factory=dict)
    """Per model, the same default (JSON, e.g. ``{"openai/o3": 100000}``)."""
    unpriced_reservation: Decimal = Field(default=Decimal("1.00"), ge=0)
    """USD reserved for a request to a model the gateway has no price for yet."""
    lease_ttl_seconds: float = Field(default=15.0, gt=0)
    """A gateway's lease of a tenant's headroom stops counting this long after its last
    renewal (a killed gateway's headroom returns then)."""
    lease_refresh_seconds: float = Field(default=1.0, gt=0)
    """How often a gateway renews its leases, learns which answered requests are charged
    and returns headroom it does not use."""
    pending_ttl_seconds: float = Field(default=3600.0, gt=0)
    """An answered request whose charge has not arrived after this long stops holding
    headroom (usage held unpriced, or a quota service that is down)."""
    balance_low_fraction: Decimal = Field(default=Decimal("0.1"), ge=0, le=1)
    """``BalanceLow`` is emitted when the balance falls to this fraction of what was granted."""
    alert_webhook_url: str | None = None
    """Alerts are also POSTed here, signed with ``alert_webhook_secret`` (quota service)."""
    alert_webhook_secret: SecretStr | None = None

    close_grace: str = "72h"
    """``billing up`` closes month M (issues its invoices) once this long has passed after
    its end (a duration such as ``72h``, ``3d``; ``off`` disables it)."""
    invoice_issuer: str = Field(default="INV", pattern=r"^[A-Z0-9][A-Z0-9-]{0,15}$")
    """The invoice numbers' prefix (``INV-2026-11-000042``); numbers are gapless per issuer."""

    session_secret: SecretStr | None = None
    """Signs the dashboard's session cookies. Unset: ``billing gateway`` makes one per start
    and hands it to its workers (sessions then end when the gateway restarts); set it to
    keep sessions across restarts and to share them between gateway hosts. Required by
    ``billing gateway`` when ``BILLING_ENV=production``."""
    public_url: str | None = None
    """The dashboard's address as browsers see it (``https://billing.example.com``) when a
    proxy stands in front of the gateway: forms must come from this origin, and with
    ``https`` the session cookie is ``Secure``. Unset: the request's own scheme and host."""
    session_hours: float = Field(default=8.0, gt=0, le=24 * 30)
    """How long a dashboard sign-in lasts."""
    pipeline_metrics: str = ""
    """The pipeline services' Prometheus endpoints for the dashboard's operator view, as
    ``name=url`` pairs separated by commas (``billing up`` sets them for its services)."""

    consumer_assignment: Literal["group", "all"] = "group"
    """How the projector and the quota service take their topic's partitions: ``group``
    (a consumer group: replicas share them; a restart waits for the group to settle) or
    ``all`` (one process reads every partition, no group to join: it resumes at once after a
    crash; a second one would do the same work again, fenced by the stored offsets).
    ``billing up`` runs one of each with ``all``."""

    # -- exposure: limits, tokens, transports ---------------------------------------------------
    finance_token: SecretStr | None = None
    """Read-only bearer token for finance: ``/internal/billing/summary``, ``transactions``,
    ``drift`` and ``invoices`` only (the admin token reads and writes everything)."""
    max_body_bytes: int = Field(default=16 << 20, ge=1024)
    """Largest request body the gateway reads (413 beyond, answered before reading it)."""
    body_timeout_seconds: float = Field(default=30.0, gt=0)
    """A request body not received whole within this is answered 408 (slow clients)."""
    max_head_bytes: int = Field(default=64 << 10, ge=1024)
    """Largest request head (request line and headers) the gateway reads (431 beyond)."""
    head_timeout_seconds: float = Field(default=10.0, gt=0)
    """A request head not received whole within this of its first byte is answered 408, as
    is a new connection that sends nothing for as long (slow clients, slowloris)."""
    auth_failures_per_minute: int = Field(default=30, ge=1)
    """Failed authentications one client address may make per minute; beyond it, 429."""
    database_timeout_seconds: float = Field(default=10.0, gt=0)
    """Longest a gateway statement may run (``statement_timeout``) and a connection wait."""
    database_sslmode: (
        Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None
    ) = None
    """PostgreSQL TLS (libpq's ``sslmode``); unset: what ``BILLING_DATABASE_URL`` says."""
    database_sslrootcert: Path | None = None
    """CA bundle for ``verify-ca``/``verify-full``."""
    kafka_fetch_max_wait_ms: int = Field(default=100, ge=10, le=30_000)
    """How long a consumer's fetch may wait at the broker (``fetch_max_wait_ms``). Short
    keeps Tansu's latency low (it answers an empty fetch only when the wait is over);
    ``billing up`` makes it 500 on its s3 log, where a fetch lists every batch first."""
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    """CA bundle that signed the brokers' certificates (system CAs when unset)."""
    kafka_ssl_certfile: Path | None = None
    """Client certificate (mutual TLS), with ``kafka_ssl_keyfile``."""
    kafka_ssl_keyfile: Path | None = None

    @field_validator("close_grace")
    @classmethod
    def _grace(cls, value: str) -> str:
        parse_grace(value)  # ValueError: pydantic names the setting
        return value

    @property
    def close_grace_delta(self) -> timedelta | None:
        return parse_grace(self.close_grace)

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> Settings:
        if self.env == "development":
            return self
        token = self.admin_token.get_secret_value() if self.admin_token else None
        if token is None or token.strip().lower() in PLACEHOLDER_SECRETS:
            raise ConfigError(
                "BILLING_ADMIN_TOKEN must be set to a real secret outside development"
            )
        return self

    @field_validator("finance_token")
    @classmethod
    def _finance_token(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is None or not value.get_secret_value().strip() else value

    @model_validator(mode="after")
    def _distinct_tokens(self) -> Settings:
        if self.finance_token is None:
            return self
        if self.admin_token is None:  # /internal would be open to anyone: nothing to limit
            raise ConfigError("BILLING_FINANCE_TOKEN needs BILLING_ADMIN_TOKEN set too")
        finance = self.finance_token.get_secret_value()
        if hmac.compare_digest(finance.encode(), self.admin_token.get_secret_value().encode()):
            raise ConfigError("BILLING_FINANCE_TOKEN must differ from BILLING_ADMIN_TOKEN")
        if self.env != "development" and finance.strip().lower() in PLACEHOLDER_SECRETS:
            raise ConfigError("BILLING_FINANCE_TOKEN must be a real secret outside development")
        return self

    @field_validator("session_secret")
    @classmethod
    def _session_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None  # unset (compose passes an empty string)
        if len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (it signs session cookies)")
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not http(s)://host[:port]")
        if parts.path.strip("/") or parts.query or parts.fragment or parts.username:
            raise ValueError(f"{value!r}: only the scheme, host and port")
        # As browsers send it in Origin: the host lower-cased, no default port.
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        default = {"http": 80, "https": 443}[parts.scheme]
        port = "" if parts.port in (None, default) else f":{parts.port}"
        return f"{parts.scheme}://{host}{port}"

    @field_validator("pipeline_metrics")
    @classmethod
    def _pipeline_metrics(cls, value: str) -> str:
        for pair in filter(None, (p.strip() for p in value.split(","))):
            name, _, url = pair.partition("=")
            if not name.strip() or not url.strip().startswith(("http://", "https://")):
                raise ValueError(f"{pair!r} is not name=http(s)://host:port/metrics")
        return value

    @property
    def pipeline_endpoints(self) -> list[tuple[str, str]]:
        """(service name, metrics URL) of ``pipeline_metrics``."""
        pairs = (p.strip().partition("=") for p in self.pipeline_metrics.split(",") if p.strip())
        return [(name.strip(), url.strip()) for name, _, url in pairs]

    @property
    def price_book_path(self) -> Path:
        return price_book_path(self.data_dir)

    @property
    def usage_spool_dir(self) -> Path:
        return self.spool_dir or self.data_dir / "spool"
