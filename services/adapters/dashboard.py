"""The dashboard's reads and its sign-in sessions, in PostgreSQL (migration 010).

Every read is served by the summary tables (``tenant_billing_summary`` per day,
``billing_spend_minutes`` per minute) or by an index (a keyset page of transactions, one
request's adjustments): nothing here scans ``billing_transactions`` by time, so a page costs
the same at 10 or 10,000 requests a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import asyncpg

Role = Literal["tenant", "operator"]


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who a live session belongs to: an operator, or one key of one tenant."""

    role: Role
    tenant_id: str | None = None
    api_key_id: str | None = None


# -- sessions -----------------------------------------------------------------------------------


async def open_session(
    connection: asyncpg.Connection,
    session_hash: bytes,
    viewer: Viewer,
    expires_at: datetime,
    token_hash: bytes | None = None,
) -> None:
    """Record a new session (an operator's with ``token_hash``, what it signed in with), and
    forget sessions that ended over a day ago."""
    async with connection.transaction():
        await connection.execute(
            "DELETE FROM billing_dashboard_sessions WHERE expires_at < now() - interval '1 day'"
        )
        await connection.execute(
            "INSERT INTO billing_dashboard_sessions"
            " (session_hash, role, tenant_id, api_key_id, token_hash, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            session_hash,
            viewer.role,
            viewer.tenant_id,
            viewer.api_key_id,
            token_hash,
            expires_at,
        )


async def live_session(
    connection: asyncpg.Connection, session_hash: bytes, token_hash: bytes | None
) -> Viewer | None:
    """The viewer of a session that has not expired nor been ended, and whose credential
    still holds: a tenant's API key not revoked, an operator's admin token still
    ``token_hash`` (the gateway's now; ``None``: none, so no operator); else ``None``."""
    row = await connection.fetchrow(
        "SELECT s.role, s.tenant_id, s.api_key_id FROM billing_dashboard_sessions s"
        " LEFT JOIN api_keys k ON k.key_id = s.api_key_id"
        " WHERE s.session_hash = $1 AND s.ended_at IS NULL AND s.expires_at > now()"
        " AND CASE s.role WHEN 'operator' THEN s.token_hash = $2"
        " ELSE k.revoked_at IS NULL AND k.tenant_id = s.tenant_id END",
        session_hash,
        token_hash,
    )
    return None if row is None else Viewer(row["role"], row["tenant_id"], row["api_key_id"])


async def end_session(connection: asyncpg.Connection, session_hash: bytes) -> None:
    await connection.execute(
        "UPDATE billing_dashboard_sessions SET ended_at = now()"
        " WHERE session_hash = $1 AND ended_at IS NULL",
        session_hash,
    )


# -- a tenant's spend ---------------------------------------------------------------------------


async def spend_since_day(
    connection: asyncpg.Connection, tenant_id: str, since: date
) -> tuple[int, Decimal]:
    """(requests, spend) of the tenant from the UTC day ``since`` on, from the summary (the
    same rows and sum as ``GET /v1/billing/summary?since=…``)."""
    row = await connection.fetchrow(
        "SELECT coalesce(sum(requests), 0)::bigint AS requests,"
        " coalesce(sum(total_cost), 0) AS cost FROM tenant_billing_summary"
        " WHERE tenant_id = $1 AND day >= $2",
        tenant_id,
        since,
    )
    return row["requests"], row["cost"]


async def spend_by_day(
    connection: asyncpg.Connection, tenant_id: str, since: date
) -> list[tuple[date, int, Decimal]]:
    rows = await connection.fetch(
        "SELECT day, sum(requests)::bigint AS requests, sum(total_cost) AS cost"
        " FROM tenant_billing_summary WHERE tenant_id = $1 AND day >= $2 GROUP BY day",
        tenant_id,
        since,
    )
    return [(r["day"], r["requests"], r["cost"]) for r in rows]


async def spend_by_hour(
    connection: asyncpg.Connection, tenant_id: str, since: datetime
) -> dict[datetime, tuple[int, Decimal]]:
    rows = await connection.fetch(
        "SELECT date_trunc('hour', minute, 'UTC') AS hour, sum(requests)::bigint AS requests,"
        " sum(total_cost) AS cost FROM billing_spend_minutes"
        " WHERE tenant_id = $1 AND minute >= $2 GROUP BY 1",
        tenant_id,
        since,
    )
    return {r["hour"]: (r["requests"], r["cost"]) for r in rows}


async def spend_by(
    connection: asyncpg.Connection,
    tenant_id: str,
    column: Literal["model", "api_key_id"],
    since: date,
) -> list[tuple[str, int, Decimal]]:
    """(model or API key id, requests, spend) since the UTC day ``since``, largest first."""
    query = {
        "model": "SELECT model AS name, sum(requests)::bigint AS requests,"
        " sum(total_cost) AS cost FROM tenant_billing_summary WHERE tenant_id = $1"
        " AND day >= $2 GROUP BY model ORDER BY cost DESC, name",
        "api_key_id": "SELECT api_key_id AS name, sum(requests)::bigint AS requests,"
        " sum(total_cost) AS cost FROM tenant_billing_summary WHERE tenant_id = $1"
        " AND day >= $2 GROUP BY api_key_id ORDER BY cost DESC, name",
    }[column]
    rows = await connection.fetch(query, tenant_id, since)
    return [(r["name"], r["requests"], r["cost"]) for r in rows]


async def key_names(connection: asyncpg.Connection, tenant_id: str) -> dict[str, str]:
    """The tenant's API key ids and their names (never the keys: only their hashes exist)."""
    rows = await connection.fetch(
        "SELECT key_id, name FROM api_keys WHERE tenant_id = $1", tenant_id
    )
    return {r["key_id"]: r["name"] for r in rows}


async def revisions_of(
    connection: asyncpg.Connection, tenant_id: str, request_id: str
) -> list[dict[str, Any]]:
    """The re-ratings of one of the tenant's requests, oldest first."""
    rows = await connection.fetch(
        "SELECT old_revision, new_revision, old_total_cost, new_total_cost, delta_cost,"
        " price_version, reason, created_at FROM billing_adjustments"
        " WHERE request_id = $1 AND tenant_id = $2 ORDER BY id",
        request_id,
        tenant_id,
    )
    return [dict(r) for r in rows]


async def transaction_of(
    connection: asyncpg.Connection, tenant_id: str, request_id: str, columns: str
) -> asyncpg.Record | None:
    """One of the tenant's transactions (``columns``: a constant list of column names)."""
    return await connection.fetchrow(
        f"SELECT {columns} FROM billing_transactions"  # noqa: S608  # constant names
        " WHERE request_id = $1 AND tenant_id = $2",
        request_id,
        tenant_id,
    )


# -- every tenant: the operator's view ------------------------------------------------------------


async def tenants_ranked(
    connection: asyncpg.Connection, month_start: date, today: date, since_minute: datetime
) -> list[dict[str, Any]]:
    """Every tenant with spend this month or in the rate window: month and today's spend and
    requests, and what the minutes since ``since_minute`` counted; by month's spend."""
    rows = await connection.fetch(
        "WITH month AS (SELECT tenant_id, sum(requests)::bigint AS requests,"
        "   sum(total_cost) AS cost,"
        "   coalesce(sum(total_cost) FILTER (WHERE day = $2), 0) AS today_cost,"
        "   coalesce(sum(requests) FILTER (WHERE day = $2), 0)::bigint AS today_requests"
        "   FROM tenant_billing_summary WHERE day >= $1 GROUP BY tenant_id),"
        " recent AS (SELECT tenant_id, sum(requests)::bigint AS requests,"
        "   sum(total_cost) AS cost FROM billing_spend_minutes WHERE minute >= $3"
        "   GROUP BY tenant_id)"
        " SELECT tenant_id, coalesce(m.requests, 0) AS requests, coalesce(m.cost, 0) AS cost,"
        " coalesce(m.today_requests, 0) AS today_requests,"
        " coalesce(m.today_cost, 0) AS today_cost,"
        " coalesce(r.requests, 0) AS recent_requests, coalesce(r.cost, 0) AS recent_cost"
        " FROM month m FULL JOIN recent r USING (tenant_id)"
        " ORDER BY cost DESC, tenant_id",
        month_start,
        today,
        since_minute,
    )
    return [dict(r) for r in rows]


async def unpriced_by_model(connection: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await connection.fetch(
        "SELECT provider_model_id AS model, count(*) AS requests, min(first_seen) AS oldest"
        " FROM unpriced_usage GROUP BY provider_model_id ORDER BY requests DESC, model"
    )
    return [dict(r) for r in rows]


async def recent_corrections(connection: asyncpg.Connection, limit: int) -> list[dict[str, Any]]:
    """The newest operator price corrections (the override layer of the price book)."""
    rows = await connection.fetch(
        "SELECT version, model, source, reason, effective_from, recorded_at FROM price_versions"
        " WHERE layer = 'override' ORDER BY recorded_at DESC, version DESC LIMIT $1",
        limit,
    )
    return [dict(r) for r in rows]


async def recent_reprice_runs(connection: asyncpg.Connection, limit: int) -> list[dict[str, Any]]:
    rows = await connection.fetch(
        "SELECT run_id, reason, since, until, model, tenant_id, source, started_at, emitted,"
        " applied_at FROM reprice_runs ORDER BY started_at DESC LIMIT $1",
        limit,
    )
    return [dict(r) for r in rows]
