"""The monthly partitions of ``billing_transactions`` (migration 005): listed, created ahead
and on demand, and retired past the retention setting.

A partition holds one UTC month of ``occurred_at`` and is named ``<table>_yYYYYmMM``. The
projector creates the current month's and the next ``AHEAD`` months' partitions at start
and then every hour, and the partition of a late month the first time a row needs it.
Retiring a month (``retire``) records it in ``billing_retired_months`` (its row count and
total), then detaches its partition (kept as a plain table for an operator to archive) or
drops it. From then on the month is frozen: ``tenant_billing_summary`` keeps its totals and
the log keeps its events, but events for it are no longer applied (``retired_before``).

Run these in the projector's process (or under its fence): retiring between its batches is
what keeps a batch from writing to a month that is being retired.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Literal

from services.core.periods import add_months, month_bounds, month_of, month_range

if TYPE_CHECKING:
    from collections.abc import Iterable

    import asyncpg

log = logging.getLogger("billing.partitions")

TABLE = "billing_transactions"
AHEAD = 2
"""Months after the current one whose partitions exist before any row needs them."""
_NAME = re.compile(r"_y(\d{4})m(\d{2})$")

RetentionAction = Literal["detach", "drop"]


def partition_name(table: str, month: date) -> str:
    return f"{table}_y{month.year:04d}m{month.month:02d}"


@dataclass(frozen=True, slots=True)
class RetiredMonth:
    month: date
    transactions: int
    total_cost: Decimal
    action: str
    partition: str
    retired_at: datetime


def _identifier(name: str) -> str:
    """``name`` if it fits PostgreSQL's 63 bytes, else its first 54 characters and a hash of
    the whole (cutting alone could give two indexes of one partition the same name)."""
    if len(name.encode()) <= 63:
        return name
    return f"{name[:54]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"  # noqa: S324 - a name


async def partition_names(connection: asyncpg.Connection, table: str = TABLE) -> list[str]:
    """The names of ``table``'s partitions (none for a table that is not partitioned)."""
    rows = await connection.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = $1::regclass",
        table,
    )
    return [row["relname"] for row in rows]


async def partition_months(connection: asyncpg.Connection, table: str = TABLE) -> set[date]:
    """The months ``table`` has a partition for (by the partitions' names)."""
    months = set()
    for name in await partition_names(connection, table):
        if (match := _NAME.search(name)) is not None:
            months.add(date(int(match.group(1)), int(match.group(2)), 1))
    return months


async def create_partitions(
    connection: asyncpg.Connection, months: Iterable[date], table: str = TABLE
) -> list[date]:
    """Create the partitions of ``months`` that ``table`` lacks; return the months created."""
    wanted = set(months) - await partition_months(connection, table)
    for month in sorted(wanted):
        start, end = month_bounds(month)
        # Identifiers from a date; the bounds are timestamps we format: no user text here.
        await connection.execute(
            f'CREATE TABLE IF NOT EXISTS "{partition_name(table, month)}"'
            f" PARTITION OF {table} FOR VALUES FROM ('{start.isoformat()}')"
            f" TO ('{end.isoformat()}')"
        )
        await name_indexes(connection, partition_name(table, month), table)
        log.info("created partition %s", partition_name(table, month))
    return sorted(wanted)


async def name_indexes(connection: asyncpg.Connection, partition: str, parent: str) -> None:
    """Name each index of ``partition`` after it and its parent index: ``<partition>_pkey``,
    ``<partition>_tenant_time``, … (PostgreSQL's own names are cut at 63 bytes and differ
    with the columns), so every partition's indexes read alike, however it was made."""
    for index in await connection.fetch(
        "SELECT ci.relname AS name, cp.relname AS parent FROM pg_index x"
        " JOIN pg_class ci ON ci.oid = x.indexrelid"
        " JOIN pg_inherits h ON h.inhrelid = x.indexrelid"
        " JOIN pg_class cp ON cp.oid = h.inhparent WHERE x.indrelid = $1::regclass",
        partition,
    ):
        role = index["parent"].removeprefix(parent).lstrip("_")
        name = _identifier(f"{partition}_{role}")
        if name != index["name"]:
            await connection.execute(f'ALTER INDEX "{index["name"]}" RENAME TO "{name}"')


def months_ahead(now: datetime, ahead: int = AHEAD) -> list[date]:
    """The current UTC month and the ``ahead`` months after it."""
    current = month_of(now)
    return month_range(current, add_months(current, ahead))


def retention_cutoff(now: datetime, keep_months: int) -> date:
    """The first month kept when ``keep_months`` full months before the current one are
    kept (with the current month): every earlier month is retired."""
    return add_months(month_of(now), -keep_months)


async def retired_before(connection: asyncpg.Connection) -> datetime | None:
    """The first instant not retired (events that occurred earlier are not applied), or
    None when no month was ever retired."""
    newest = await connection.fetchval("SELECT max(month) FROM billing_retired_months")
    return None if newest is None else month_bounds(newest)[1]


async def retire(
    connection: asyncpg.Connection,
    cutoff: date,
    action: RetentionAction = "detach",
    table: str = TABLE,
) -> list[RetiredMonth]:
    """Retire every month before ``cutoff`` that still has a partition, oldest first, each in
    its own transaction; return what was retired."""
    retired = []
    for month in sorted(m for m in await partition_months(connection, table) if m < cutoff):
        name = partition_name(table, month)
        async with connection.transaction():
            figures = await connection.fetchrow(
                f'SELECT count(*) AS n, coalesce(sum(total_cost), 0) AS total FROM "{name}"'  # noqa: S608
            )
            row = await connection.fetchrow(
                "INSERT INTO billing_retired_months"
                " (month, transactions, total_cost, action, partition)"
                " VALUES ($1, $2, $3, $4, $5) RETURNING *",
                month,
                figures["n"],
                figures["total"],
                action,
                name,
            )
            await connection.execute(f'ALTER TABLE {table} DETACH PARTITION "{name}"')
            if action == "drop":
                await connection.execute(f'DROP TABLE "{name}"')
        log.info("retired %s (%s, %d rows)", month.isoformat()[:7], action, figures["n"])
        retired.append(RetiredMonth(**dict(row)))
    return retired


async def retired_months(connection: asyncpg.Connection) -> list[RetiredMonth]:
    rows = await connection.fetch("SELECT * FROM billing_retired_months ORDER BY month")
    return [RetiredMonth(**dict(r)) for r in rows]
