"""``billing_spend_minutes``: requests and spend per tenant and UTC minute (migration 010).

The projector adds each batch's increments (:func:`add_minutes`, in the batch's transaction)
and drops minutes past ``MINUTES_KEPT_DAYS`` (:func:`prune_minutes`); ``billing rebuild``
(``services.jobs.rebuild``) derives the kept minutes again from the rebuilt transactions, in a
table it swaps in. The dashboard reads them for its chart by hour and the operator's
per-minute rates.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

from services.adapters.readmodels import MINUTES_KEPT_DAYS, MinuteKey

if TYPE_CHECKING:
    import asyncpg

KEPT = timedelta(days=MINUTES_KEPT_DAYS)


async def add_minutes(
    connection: asyncpg.Connection, minutes: dict[MinuteKey, tuple[int, Decimal]]
) -> None:
    """Add (requests, total_cost) increments at each (tenant, minute)."""
    await connection.execute(
        "INSERT INTO billing_spend_minutes AS m (tenant_id, minute, requests, total_cost)"
        " SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::bigint[], $4::numeric[])"
        " ON CONFLICT (tenant_id, minute) DO UPDATE"
        " SET requests = m.requests + EXCLUDED.requests,"
        " total_cost = m.total_cost + EXCLUDED.total_cost",
        [tenant for tenant, _ in minutes],
        [minute for _, minute in minutes],
        [requests for requests, _ in minutes.values()],
        [cost for _, cost in minutes.values()],
    )


async def prune_minutes(connection: asyncpg.Connection, now: datetime) -> int:
    """Drop the minutes older than ``MINUTES_KEPT_DAYS`` before ``now``; how many went."""
    status = await connection.execute(
        "DELETE FROM billing_spend_minutes WHERE minute < $1", now - KEPT
    )
    return int(status.split()[-1])
