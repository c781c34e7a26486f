"""The read-model tables' shape, shared by the projector, the rebuild job and the queries.

``billing_transactions`` holds one row per ``request_id`` (its current revision) in
``TRANSACTION_COLUMNS`` order, as :func:`transaction_row` builds it from a ``UsagePriced``;
``tenant_billing_summary`` holds ``SUMMARY_VALUES`` per ``SUMMARY_KEY`` (tenant × UTC day
of ``occurred_at`` × model × api key or ''), the sum of the rows :func:`summary_key` puts
there; ``billing_spend_minutes`` holds ``requests`` and ``total_cost`` per tenant × UTC minute
(:func:`minute_key`); ``billing_adjustments`` holds one ``ADJUSTMENT_COLUMNS`` row per
re-rating.

Pure code (the tables' shape, not their I/O): no database client and no pydantic is
imported, so the CLI can load it at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Final

from services.core.cost import COMPONENTS
from services.core.usage import Usage

if TYPE_CHECKING:
    from services.core.events import UsagePriced

PROJECTOR_CONSUMER: Final = "projector"
"""The name the projector's offsets are stored under in ``consumer_offsets``."""
REBUILD_LOCK: Final = 0x62696C6C_72626C64
"""``billing rebuild``'s advisory lock ("billrbld"): one rebuild at a time, and the local
log's retention sweep waits while it is held (the rebuild reads the log from offset 0)."""

COUNT_COLUMNS: Final = Usage._fields
"""One column per normalised count."""
COST_COLUMNS: Final = (*COMPONENTS, "total_cost")
"""One column per breakdown component, then the total."""
TRANSACTION_COLUMNS: Final = (
    "request_id",
    "tenant_id",
    "api_key_id",
    "provider",
    "provider_model_id",
    "model",
    "occurred_at",
    "recorded_at",
    "usage_source",
    *COUNT_COLUMNS,
    *COST_COLUMNS,
    "currency",
    "reported_cost",
    "reported_is_byok",
    "price_version",
    "revision",
    "priced_at",
    "metadata",
)
SUMMARY_KEY: Final = ("tenant_id", "day", "model", "api_key_id")
SUMMARY_VALUES: Final = (*COUNT_COLUMNS, *COST_COLUMNS)
"""The summed columns; they sit contiguously in ``TRANSACTION_COLUMNS`` too."""
ADJUSTMENT_COLUMNS: Final = (
    "request_id",
    "tenant_id",
    "old_revision",
    "new_revision",
    "old_total_cost",
    "new_total_cost",
    "delta_cost",
    "price_version",
    "reason",
)

SummaryKey = tuple[str, date, str, str]
"""A ``SUMMARY_KEY`` value: (tenant, UTC day, model, api key or '')."""
MinuteKey = tuple[str, datetime]
"""A ``billing_spend_minutes`` key: (tenant, UTC minute)."""
MINUTES_KEPT_DAYS: Final = 35
"""How long ``billing_spend_minutes`` keeps a minute (the dashboard shows at most 30 days)."""

_FIRST_VALUE = TRANSACTION_COLUMNS.index(SUMMARY_VALUES[0])
SUMMARY_VALUE_SLICE: Final = slice(_FIRST_VALUE, _FIRST_VALUE + len(SUMMARY_VALUES))
"""Where a transaction row's ``SUMMARY_VALUES`` are: ``row[SUMMARY_VALUE_SLICE]``."""
_TENANT, _API_KEY, _MODEL, _OCCURRED_AT = (
    TRANSACTION_COLUMNS.index(c) for c in ("tenant_id", "api_key_id", "model", "occurred_at")
)


_counts_of = attrgetter(*COUNT_COLUMNS)  # one C call per row instead of a generator
_costs_of = attrgetter(*COST_COLUMNS)


def transaction_row(event: UsagePriced) -> tuple[Any, ...]:
    """The ``billing_transactions`` row (``TRANSACTION_COLUMNS`` order) of ``event``."""
    usage, breakdown, reported = event.usage, event.breakdown, event.reported
    charge = None
    if reported is not None:  # what the upstream charged: BYOK bills the inference cost
        charge = (
            reported.upstream_inference_cost
            if reported.is_byok and reported.upstream_inference_cost is not None
            else reported.cost
        )
    return (
        event.request_id,
        event.tenant_id,
        event.api_key_id,
        event.provider,
        event.provider_model_id,
        event.model,
        event.occurred_at,
        event.recorded_at,
        event.usage_source,
        *_counts_of(usage),
        *_costs_of(breakdown),
        event.currency,
        charge,
        reported.is_byok if reported else False,
        event.price_version,
        event.revision,
        event.priced_at,
        event.metadata,
    )


def summary_key(row: Sequence[Any]) -> SummaryKey:
    """The ``SUMMARY_KEY`` of a ``TRANSACTION_COLUMNS`` row (a tuple or a fetched record)."""
    occurred_at: datetime = row[_OCCURRED_AT]
    return (row[_TENANT], occurred_at.astimezone(UTC).date(), row[_MODEL], row[_API_KEY] or "")


def minute_key(row: Sequence[Any]) -> MinuteKey:
    """The ``billing_spend_minutes`` key of a ``TRANSACTION_COLUMNS`` row."""
    occurred_at: datetime = row[_OCCURRED_AT]
    return row[_TENANT], occurred_at.astimezone(UTC).replace(second=0, microsecond=0)
