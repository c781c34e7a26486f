"""Prometheus metrics of every service (one registry per process)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal

from prometheus_client import Counter, Gauge, Histogram

INGESTED = Counter(
    "billing_ingested_events_total", "UsageRecorded events acknowledged by the broker"
)
INGEST_REJECTED = Counter("billing_ingest_rejected_items_total", "Ingest items refused as invalid")
TENANTS_CREATED = Counter(
    "billing_tenants_created_total",
    "Tenants created because usage arrived for them (BILLING_UNKNOWN_TENANTS=create)",
)
PRICED = Counter("billing_priced_events_total", "UsagePriced events emitted by the pricer")
UNPRICED = Counter("billing_unpriced_events_total", "Usage held back because no price was known")
DEAD_LETTERED = Counter(
    "billing_dead_lettered_total", "Messages sent to the dead-letter topic", ["source"]
)
PROJECTED = Counter("billing_projected_events_total", "UsagePriced events applied to PostgreSQL")
DUPLICATES = Counter(
    "billing_duplicates_skipped_total", "Events already reflected in the read models"
)
RETIRED_SKIPPED = Counter(
    "billing_retired_events_skipped_total",
    "Events of a retired month (BILLING_RETENTION_MONTHS): not applied, totals frozen",
)
BATCH_SIZE = Histogram(
    "billing_batch_size",
    "Messages per processed batch",
    ["service"],
    buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000),
)
DB_WRITE_SECONDS = Histogram(
    "billing_db_write_seconds",
    "Duration of one projector transaction",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DB_RETRIES = Counter(
    "billing_db_retries_total",
    "Projector and quota-service batch transactions retried after a database failure",
)
PIPELINE_LAG = Gauge(
    "billing_pipeline_lag_seconds",
    "Now minus recorded_at of the newest event a service handled (from event timestamps);"
    " while events wait for it (in its input or upstream of it, e.g. usage not yet priced),"
    " at least the age of the oldest waiting one, so it grows when nothing moves",
    ["service"],
)
_LAGS: dict[str, list[float]] = {}
"""service → [lag of the newest handled event when handled, age of the oldest waiting one]."""


def observe_handled(service: str, newest_recorded_at: datetime) -> None:
    """A batch was handled; ``newest_recorded_at`` is its newest event's ``recorded_at``."""
    lags = _LAGS.setdefault(service, [0.0, 0.0])
    lags[0] = (datetime.now(UTC) - newest_recorded_at).total_seconds()
    lags[1] = 0.0  # what waited was (at least partly) handled; the watcher looks again
    PIPELINE_LAG.labels(service).set(lags[0])


def observe_waiting(service: str, oldest_age: float) -> None:
    """The oldest event waiting for ``service`` is ``oldest_age`` seconds old (0: none)."""
    lags = _LAGS.setdefault(service, [0.0, 0.0])
    lags[1] = oldest_age
    PIPELINE_LAG.labels(service).set(max(lags))


EMIT_QUEUE_DEPTH = Gauge(
    "billing_emit_queue_depth", "Usage events waiting in the gateway for the broker"
)
EMIT_OLDEST_AGE = Gauge(
    "billing_emit_oldest_unsent_seconds", "Age of the oldest usage event not yet acknowledged"
)
SPOOL_BYTES = Gauge("billing_spool_bytes", "Bytes of usage waiting in the gateway's on-disk spool")
SPOOLED = Counter("billing_spooled_events_total", "Usage events written to the spool")
RESENT = Counter("billing_spool_resent_events_total", "Spooled usage events the broker took")
SPOOL_REJECTED = Counter(
    "billing_spool_rejected_lines_total", "Spool lines that did not decode (kept in rejected.jsonl)"
)
PROXY_RETRIED = Counter(
    "billing_proxy_retried_total",
    "Proxied requests re-sent on a new connection: their pooled one had been closed upstream",
)
PROXY_REFUSED = Counter(
    "billing_proxy_refused_total",
    "Proxy requests refused with 503: the usage spool is full, or the gateway at capacity",
    ["reason"],
)

# Per-request reconciliation (the monthly one is `billing reconcile`): the projector
# checks every request it inserts for the first time against the charge the upstream
# reported (revisions are not checked again, so each request counts once; GET
# /internal/billing/drift reads the current revisions). Observed only after the batch
# committed: a retried batch counts once.
REPORTED_COST_TOLERANCE = Decimal("0.0001")
"""|computed - reported| below this (USD) counts as "within" (as README's accuracy figures)."""
REPORTED_COST_CHECKED = Counter(
    "billing_reported_cost_checked_total",
    "Newly projected requests carrying an upstream-reported cost, by whether the computed"
    " cost is within $0.0001 of it",
    ["outcome"],
)
REPORTED_COST_DRIFT = Histogram(
    "billing_reported_cost_drift_usd",
    "|computed - reported| per newly projected request that carries a reported cost (USD)",
    buckets=(1e-9, 1e-6, 1e-5, 5e-5, 1e-4, 1e-3, 1e-2, 0.1, 1),
)
for _outcome in ("within", "outside"):
    REPORTED_COST_CHECKED.labels(_outcome)  # both series exist from the start, at 0


def observe_reported_drift(differences: Iterable[Decimal]) -> None:
    """Count and histogram |computed - reported| of newly projected requests (float only
    here: a metric is an approximation, never money)."""
    within = outside = 0
    for difference in differences:
        if difference < REPORTED_COST_TOLERANCE:
            within += 1
        else:
            outside += 1
        REPORTED_COST_DRIFT.observe(float(difference))
    if within:
        REPORTED_COST_CHECKED.labels("within").inc(within)
    if outside:
        REPORTED_COST_CHECKED.labels("outside").inc(outside)


UNBILLABLE = Counter(
    "billing_unbillable_requests_total",
    "Answered proxy requests no usage event could be made for (logged with the request id)",
    ["reason"],
)

# -- balances and budgets (issue #11) --------------------------------------------------------
RESERVATIONS = Counter(
    "billing_quota_reservations_total",
    "Admission reservations by outcome: made, refused (402), settled (the charge arrived),"
    " released (nothing to charge), expired (no charge arrived in time)",
    ["outcome"],
)
for _outcome in ("made", "refused", "settled", "released", "expired"):
    RESERVATIONS.labels(_outcome)
RESERVED_USD = Gauge(
    "billing_quota_reserved_usd",
    "USD this gateway process holds reserved for requests in flight (approximate: a float)",
    multiprocess_mode="livesum",
)
PENDING_USD = Gauge(
    "billing_quota_pending_usd",
    "USD this gateway process holds for answered requests not yet charged (approximate)",
    multiprocess_mode="livesum",
)


def add_usd(gauge: Gauge, amount: Decimal) -> None:
    """Move a USD gauge by ``amount`` (float only here: a metric approximates, never money)."""
    gauge.inc(float(amount))


LEASE_REFILLS = Counter(
    "billing_quota_lease_refills_total", "Leases of a scope's headroom taken from PostgreSQL"
)
LEASES_LOST = Counter(
    "billing_quota_leases_lost_total",
    "Leases whose row expired before this process renewed it while it still held"
    " reservations or pending charges (it stalled longer than BILLING_LEASE_TTL_SECONDS):"
    " meanwhile others could lease that headroom again",
)
CHARGES = Counter(
    "billing_quota_charges_total", "Cost deltas the quota service applied to balances"
)
ALERTS = Counter("billing_quota_alerts_total", "Alerts recorded by the quota service")
WEBHOOKS = Counter(
    "billing_quota_webhook_deliveries_total",
    "Alert webhook attempts by outcome (delivered, failed, abandoned)",
    ["outcome"],
)
