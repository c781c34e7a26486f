"""What a batch of ``UsagePriced`` does to the read models: a pure fold, no database.

Per request the batch's highest revision counts (the first one delivered among equals).
Against the stored row of that request: none → the row is inserted; a lower revision → the
row is replaced and the re-rating booked as an adjustment; an equal or higher revision →
a duplicate or a stale revision, which changes nothing. The summary moves by exactly the
applied differences: + the new row's values at its key, − the replaced row's at its own
(a revision can move a request to another day, model or key); the minutes of
``billing_spend_minutes`` move the same way (one request and its total). Money is summed in the
exact context, so a summary stays the exact sum of its transactions.

A revision whose ``occurred_at`` differs from the stored row's lands in another partition
key (migration 005): the stored row is listed in ``moved`` for the writer to delete.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import Any

from services.adapters.readmodels import (
    COST_COLUMNS,
    COUNT_COLUMNS,
    SUMMARY_VALUE_SLICE,
    TRANSACTION_COLUMNS,
    MinuteKey,
    SummaryKey,
    minute_key,
    summary_key,
    transaction_row,
)
from services.core.events import UsagePriced
from services.core.money import EXACT, difference

Row = Sequence[Any]
"""A ``billing_transactions`` row in ``TRANSACTION_COLUMNS`` order (a tuple, or an asyncpg
record fetched with those columns)."""

_TOTAL = TRANSACTION_COLUMNS.index("total_cost")
_REPORTED = TRANSACTION_COLUMNS.index("reported_cost")
_REVISION = TRANSACTION_COLUMNS.index("revision")
_OCCURRED_AT = TRANSACTION_COLUMNS.index("occurred_at")


@dataclass(frozen=True, slots=True)
class Plan:
    """The writes of one batch, for ``apply_batch`` to carry out."""

    rows: list[tuple[Any, ...]]
    """``TRANSACTION_COLUMNS`` rows to upsert, at most one per request."""
    deltas: dict[SummaryKey, tuple[Any, ...]]
    """``SUMMARY_KEY`` → increments of ``SUMMARY_VALUES`` (counts int, money exact)."""
    minutes: dict[MinuteKey, tuple[int, Decimal]]
    """(tenant, UTC minute) → increments of (requests, total_cost)."""
    adjustments: list[tuple[Any, ...]]
    """``ADJUSTMENT_COLUMNS`` rows, one per replaced row."""
    inserted: int
    revised: int
    duplicates: int
    """Events that changed nothing (redeliveries, stale or superseded revisions)."""
    drifts: list[Decimal]
    """|total − reported charge| of each inserted row that has a reported charge."""
    moved: list[tuple[str, Any]]
    """(request_id, stored occurred_at) of replaced rows whose revision changed occurred_at:
    the stored row is deleted, the new one inserted under its own key."""


def newest_per_request(events: Iterable[UsagePriced]) -> list[UsagePriced]:
    """Collapse a batch to the highest revision of each request (the first among equals)."""
    best: dict[str, UsagePriced] = {}
    for event in events:
        held = best.get(event.request_id)
        if held is None or event.revision > held.revision:
            best[event.request_id] = event
    return list(best.values())


def plan(existing: Mapping[str, Row], events: Iterable[UsagePriced]) -> Plan:
    """Fold ``events`` onto ``existing`` (request_id → its stored row, for at least every
    request in ``events`` that has one)."""
    events = list(events)
    rows: list[tuple[Any, ...]] = []
    deltas: dict[SummaryKey, list[Any]] = {}
    minutes: dict[MinuteKey, tuple[int, Decimal]] = {}
    adjustments: list[tuple[Any, ...]] = []
    drifts: list[Decimal] = []
    moved: list[tuple[str, Any]] = []
    with localcontext(EXACT):  # 30-place sums need more than the default 28 digits
        for event in newest_per_request(events):
            old = existing.get(event.request_id)
            if old is not None and old[_REVISION] >= event.revision:
                continue  # a duplicate or a stale revision: already reflected
            row = transaction_row(event)
            rows.append(row)
            _add(deltas, summary_key(row), row[SUMMARY_VALUE_SLICE], +1)
            _count(minutes, minute_key(row), 1, row[_TOTAL])
            if old is None:
                if (charge := row[_REPORTED]) is not None:
                    drifts.append(abs(difference(row[_TOTAL], charge)))
                continue
            _add(deltas, summary_key(old), old[SUMMARY_VALUE_SLICE], -1)
            _count(minutes, minute_key(old), -1, -old[_TOTAL])
            if old[_OCCURRED_AT] != row[_OCCURRED_AT]:
                moved.append((event.request_id, old[_OCCURRED_AT]))
            adjustments.append(
                (
                    event.request_id,
                    event.tenant_id,
                    old[_REVISION],
                    event.revision,
                    old[_TOTAL],
                    event.total_cost,
                    difference(event.total_cost, old[_TOTAL]),
                    event.price_version,
                    event.reason,
                )
            )
    return Plan(
        rows=rows,
        deltas={key: tuple(values) for key, values in deltas.items()},
        minutes=minutes,
        adjustments=adjustments,
        inserted=len(rows) - len(adjustments),
        revised=len(adjustments),
        duplicates=len(events) - len(rows),
        drifts=drifts,
        moved=moved,
    )


def _add(deltas: dict[SummaryKey, list[Any]], key: SummaryKey, values: Row, sign: int) -> None:
    """Add (``sign`` +1) or subtract (−1) one row's values at ``key``; in the exact context."""
    current = deltas.get(key)
    if current is None:
        current = deltas[key] = [0] * len(COUNT_COLUMNS) + [Decimal(0)] * len(COST_COLUMNS)
    if sign > 0:  # no sign * value: that is one more Decimal operation per column
        for index, value in enumerate(values):
            current[index] += value
    else:
        for index, value in enumerate(values):
            current[index] -= value


def _count(
    minutes: dict[MinuteKey, tuple[int, Decimal]], key: MinuteKey, requests: int, cost: Decimal
) -> None:
    """Add one request (or take one away) and its cost at a minute; in the exact context."""
    held = minutes.get(key)
    minutes[key] = (requests, cost) if held is None else (held[0] + requests, held[1] + cost)
