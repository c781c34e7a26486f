"""Prometheus metrics of every service (one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

INGESTED = Counter(
    "billing_ingested_events_total", "UsageRecorded events acknowledged by the broker"
)
INGEST_REJECTED = Counter("billing_ingest_rejected_items_total", "Ingest items refused as invalid")
PRICED = Counter("billing_priced_events_total", "UsagePriced events emitted by the pricer")
UNPRICED = Counter("billing_unpriced_events_total", "Usage held back because no price was known")
DEAD_LETTERED = Counter(
    "billing_dead_lettered_total", "Messages sent to the dead-letter topic", ["source"]
)
PROJECTED = Counter("billing_projected_events_total", "UsagePriced events applied to PostgreSQL")
DUPLICATES = Counter(
    "billing_duplicates_skipped_total", "Events already reflected in the read models"
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
DB_RETRIES = Counter("billing_db_retries_total", "Projector transactions retried after a failure")
PIPELINE_LAG = Gauge(
    "billing_pipeline_lag_seconds",
    "Now minus recorded_at of the newest event a service handled (from event timestamps)",
    ["service"],
)
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
PROXY_REFUSED = Counter(
    "billing_proxy_refused_total", "Proxy requests refused with 503 because usage had no room"
)
