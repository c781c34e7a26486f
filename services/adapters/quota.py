"""Balances, budgets, alerts and leases in PostgreSQL (migration 008; rules in ``core.quota``).

Three writers share these tables:

- the **quota service** folds ``billing.costs.v1`` in with :func:`apply_charges` (charges,
  spend, alerts and its offsets in one transaction), posts expired grants
  (:func:`post_expiries`) and empties the alerts outbox;
- each **gateway process** holds leases of the scopes it admits requests against
  (:func:`refill` under a per-scope lock, :func:`renew` for its periodic upkeep,
  :func:`settled` to learn which of its answered requests are now charged);
- the **APIs and CLI** set budgets and read balances (:func:`set_budget`, :func:`account`).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, localcontext
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from services.adapters.database import lock_named
from services.adapters.offsets import Offsets, lock_offsets, store_offsets
from services.adapters.tenants import tenant_exists
from services.core.events import Position, QuotaAlert, UsagePriced
from services.core.money import EXACT
from services.core.periods import month_of
from services.core.quota import (
    ZERO,
    Budget,
    Scope,
    balance_alert_id,
    balance_alerts,
    budget_alert_id,
    expired_remainder,
    lease_free,
    period_label,
    thresholds_reached,
)

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("billing.quota")

QUOTA_CONSUMER = "quota"
"""The name the quota service's offsets are stored under in ``consumer_offsets``."""


# -- the quota service ---------------------------------------------------------------------------


@dataclass(slots=True)
class ChargeResult:
    applied: int = 0
    duplicates: int = 0
    alerts: int = 0


async def apply_charges(
    connection: asyncpg.Connection,
    events: Sequence[UsagePriced],
    offsets: Offsets,
    positions: Sequence[Position],
    *,
    low_fraction: Decimal,
    consumer: str = QUOTA_CONSUMER,
) -> ChargeResult:
    """Charge ``events``' deltas once per (request_id, revision), move the spend sums, record
    the alerts they cross and store ``offsets`` — all in one transaction.

    Fenced like the projector: the partitions' stored offsets are locked first and events
    below them skipped, so a replay or two briefly overlapping consumers change nothing.
    """
    async with connection.transaction():
        stored = await lock_offsets(connection, consumer, offsets) if offsets else {}
        fresh: dict[tuple[str, int], UsagePriced] = {}
        for event, at in zip(events, positions, strict=True):
            if at.offset >= stored.get((at.topic, at.partition), 0):
                fresh.setdefault((event.request_id, event.revision), event)  # first one wins
        charged = await connection.fetch(
            "INSERT INTO billing_credit_charges"
            " (request_id, revision, tenant_id, api_key_id, period, amount)"
            " SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::date[],"
            " $6::numeric[]) ON CONFLICT DO NOTHING"
            " RETURNING tenant_id, api_key_id, period, amount",
            [e.request_id for e in fresh.values()],
            [e.revision for e in fresh.values()],
            [e.tenant_id for e in fresh.values()],
            [e.api_key_id or "" for e in fresh.values()],
            [month_of(e.occurred_at) for e in fresh.values()],
            [e.delta_cost for e in fresh.values()],
        )
        sums: dict[tuple[str, str, date], Decimal] = defaultdict(Decimal)
        with localcontext(EXACT):  # costs are exact to 1e-30: a sum is never rounded
            for row in charged:
                sums[(row["tenant_id"], "", row["period"])] += row["amount"]
                if row["api_key_id"]:
                    sums[(row["tenant_id"], row["api_key_id"], row["period"])] += row["amount"]
        alerts = await _move_spend(connection, sums, low_fraction) if sums else []
        new_alerts = 0
        if alerts:
            inserted = await connection.fetch(
                # The documents go as text and are cast in SQL: whatever jsonb codec the
                # connection has, the column holds the event object itself.
                "INSERT INTO billing_alerts (alert_id, tenant_id, event)"
                " SELECT a, t, e::jsonb FROM unnest($1::text[], $2::text[], $3::text[])"
                " AS x(a, t, e) ON CONFLICT DO NOTHING RETURNING alert_id",
                [a.alert_id for a in alerts],
                [a.tenant_id for a in alerts],
                [a.model_dump_json() for a in alerts],
            )
            new_alerts = len(inserted)
        if offsets:
            await store_offsets(connection, consumer, offsets)
    return ChargeResult(len(charged), len(events) - len(charged), new_alerts)


async def _move_spend(
    connection: asyncpg.Connection,
    sums: dict[tuple[str, str, date], Decimal],
    low_fraction: Decimal,
) -> list[QuotaAlert]:
    keys = sorted(sums)  # one lock order for every writer
    rows = await connection.fetch(
        "INSERT INTO billing_quota_spend (tenant_id, api_key_id, period, spent)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::date[], $4::numeric[])"
        " ON CONFLICT (tenant_id, api_key_id, period)"
        " DO UPDATE SET spent = billing_quota_spend.spent + EXCLUDED.spent"
        " RETURNING tenant_id, api_key_id, period, spent",
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [sums[k] for k in keys],
    )
    tenants = sorted({k[0] for k in keys})
    now = datetime.now(UTC)
    alerts: list[QuotaAlert] = []
    budgets = {(b.tenant_id, b.api_key_id): b for b in await _budgets(connection, tenants)}
    for row in rows:
        budget = budgets.get((row["tenant_id"], row["api_key_id"]))
        if budget is None:
            continue
        for threshold in thresholds_reached(row["spent"], budget.monthly_limit, budget.alerts):
            _add_alert(
                alerts,
                {
                    "event_type": "BudgetThresholdCrossed",
                    "alert_id": budget_alert_id(
                        budget.tenant_id, budget.api_key_id, row["period"], threshold
                    ),
                    "tenant_id": budget.tenant_id,
                    "api_key_id": budget.api_key_id or None,
                    "period": period_label(row["period"]),
                    "threshold_percent": threshold,
                    "limit": budget.monthly_limit,
                    "spent": row["spent"],
                    "hard": budget.hard,
                    "occurred_at": now,
                },
            )
    for tenant_id, ledger in (await ledgers(connection, tenants)).items():
        for kind in balance_alerts(ledger.balance, ledger.granted - ledger.expired, low_fraction):
            _add_alert(
                alerts,
                {
                    "event_type": kind,
                    "alert_id": balance_alert_id(tenant_id, kind, ledger.last_grant_id),
                    "tenant_id": tenant_id,
                    "balance": ledger.balance,
                    "granted": ledger.granted,
                    "occurred_at": now,
                },
            )
    return alerts


def _add_alert(alerts: list[QuotaAlert], fields: dict[str, Any]) -> None:
    """Add the alert of ``fields``; one that cannot be made (an amount beyond what an event
    carries, 10⁹ USD) is logged and left out: charging never stops for an alert."""
    try:
        alerts.append(QuotaAlert.model_validate(fields))
    except ValidationError as exc:
        log.error("an alert could not be made and is left out: %s", exc)


async def post_expiries(connection: asyncpg.Connection, now: datetime) -> int:
    """Post what was left of every grant that has expired (once per grant); return how many.

    Spending draws on the grant that expires first (``core.quota.expired_remainder``), and
    what is left is reckoned as of the grant's ``expires_at``: the grants made and the
    charges applied by then, the grants that had expired before posted first.
    """
    due = await connection.fetch(
        "SELECT grant_id, tenant_id, amount, expires_at FROM billing_credit_grants g"
        " WHERE expires_at <= $1 AND NOT EXISTS"
        " (SELECT 1 FROM billing_credit_expiries e WHERE e.grant_id = g.grant_id)"
        " ORDER BY expires_at, grant_id",
        now,
    )
    for grant in due:
        async with connection.transaction():
            tenant_id, at = grant["tenant_id"], grant["expires_at"]
            await lock_named(connection, f"expiry/{tenant_id}")
            then = await connection.fetchrow(
                "SELECT"
                " (SELECT coalesce(sum(amount), 0) FROM billing_credit_grants"
                "   WHERE tenant_id = $1 AND granted_at <= $2) AS granted,"
                " (SELECT coalesce(sum(amount), 0) FROM billing_credit_expiries"
                "   WHERE tenant_id = $1 AND grant_id <> $3) AS expired,"
                " (SELECT coalesce(sum(amount), 0) FROM billing_credit_charges"
                "   WHERE tenant_id = $1 AND charged_at <= $2) AS charged,"
                " (SELECT coalesce(sum(amount), 0) FROM billing_credit_grants"
                "   WHERE tenant_id = $1 AND granted_at <= $2 AND grant_id <> $3"
                "   AND (expires_at IS NULL OR (expires_at, grant_id) > ($2, $3))) AS later",
                tenant_id,
                at,
                grant["grant_id"],
            )
            with localcontext(EXACT):
                balance = then["granted"] - then["expired"] - then["charged"]
            left = expired_remainder(balance, grant["amount"], then["later"])
            await connection.execute(
                "INSERT INTO billing_credit_expiries (grant_id, tenant_id, amount, expired_at)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                grant["grant_id"],
                tenant_id,
                left,
                at,
            )
    return len(due)


# -- the alerts outbox ---------------------------------------------------------------------------


async def unpublished_alerts(
    connection: asyncpg.Connection, limit: int = 500
) -> list[tuple[str, str, bytes]]:
    """(alert_id, tenant_id, event JSON) of alerts not yet on the topic, oldest first."""
    rows = await connection.fetch(
        "SELECT alert_id, tenant_id, event::text AS event FROM billing_alerts"
        " WHERE published_at IS NULL ORDER BY created_at, alert_id LIMIT $1",
        limit,
    )
    return [(r["alert_id"], r["tenant_id"], r["event"].encode()) for r in rows]


async def mark_published(connection: asyncpg.Connection, alert_ids: Sequence[str]) -> None:
    await connection.execute(
        "UPDATE billing_alerts SET published_at = now() WHERE alert_id = ANY($1::text[])",
        list(alert_ids),
    )


async def due_webhooks(
    connection: asyncpg.Connection, now: datetime, max_attempts: int, limit: int = 100
) -> list[tuple[str, int, bytes]]:
    """(alert_id, attempts so far, event JSON) of alerts whose webhook delivery is due."""
    rows = await connection.fetch(
        "SELECT alert_id, webhook_attempts, event::text AS event FROM billing_alerts"
        " WHERE webhook_done_at IS NULL AND webhook_attempts < $2"
        " AND (webhook_next_at IS NULL OR webhook_next_at <= $1)"
        " ORDER BY created_at, alert_id LIMIT $3",
        now,
        max_attempts,
        limit,
    )
    return [(r["alert_id"], r["webhook_attempts"], r["event"].encode()) for r in rows]


async def record_webhook(
    connection: asyncpg.Connection,
    alert_id: str,
    *,
    delivered: bool,
    error: str | None = None,
    next_at: datetime | None = None,
) -> None:
    """Count one delivery attempt: done, or failed with ``error`` and retried at ``next_at``."""
    await connection.execute(
        "UPDATE billing_alerts SET webhook_attempts = webhook_attempts + 1,"
        " webhook_done_at = CASE WHEN $2 THEN now() END, webhook_error = $3,"
        " webhook_next_at = $4 WHERE alert_id = $1",
        alert_id,
        delivered,
        error,
        next_at,
    )


async def list_alerts(
    connection: asyncpg.Connection, tenant_id: str, limit: int = 100
) -> list[dict[str, Any]]:
    """The tenant's latest alerts, newest first, as emitted."""
    rows = await connection.fetch(
        "SELECT event::text AS event FROM billing_alerts WHERE tenant_id = $1"
        " ORDER BY created_at DESC, alert_id LIMIT $2",
        tenant_id,
        limit,
    )
    return [json.loads(r["event"]) for r in rows]


# -- balances and budgets ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ledger:
    """A tenant's credit ledger, summed."""

    granted: Decimal = ZERO
    expired: Decimal = ZERO
    charged: Decimal = ZERO
    last_grant_id: int = 0
    lapsed: Decimal = ZERO
    """Grants past their expiry whose remainder is not posted yet: they count as spent in
    full until the quota service posts it (within ``maintenance_seconds``)."""

    @property
    def balance(self) -> Decimal:
        with localcontext(EXACT):  # charges carry up to 1e-30: never rounded here
            return self.granted - self.expired - self.lapsed - self.charged

    @property
    def prepaid(self) -> bool:
        return self.last_grant_id > 0


async def ledgers(connection: asyncpg.Connection, tenant_ids: Iterable[str]) -> dict[str, Ledger]:
    """tenant_id → its summed ledger (zeros for a tenant with none)."""
    rows = await connection.fetch(
        "SELECT t.tenant_id,"
        " (SELECT coalesce(sum(amount), 0) FROM billing_credit_grants g"
        "   WHERE g.tenant_id = t.tenant_id) AS granted,"
        " (SELECT coalesce(max(grant_id), 0) FROM billing_credit_grants g"
        "   WHERE g.tenant_id = t.tenant_id) AS last_grant_id,"
        " (SELECT coalesce(sum(amount), 0) FROM billing_credit_expiries e"
        "   WHERE e.tenant_id = t.tenant_id) AS expired,"
        " (SELECT coalesce(sum(spent), 0) FROM billing_quota_spend s"
        "   WHERE s.tenant_id = t.tenant_id AND s.api_key_id = '') AS charged,"
        " (SELECT coalesce(sum(amount), 0) FROM billing_credit_grants g"
        "   WHERE g.tenant_id = t.tenant_id AND g.expires_at <= now() AND NOT EXISTS"
        "   (SELECT 1 FROM billing_credit_expiries e WHERE e.grant_id = g.grant_id)) AS lapsed"
        " FROM unnest($1::text[]) AS t(tenant_id)",
        list(tenant_ids),
    )
    return {
        r["tenant_id"]: Ledger(
            r["granted"], r["expired"], r["charged"], r["last_grant_id"], r["lapsed"]
        )
        for r in rows
    }


async def _budgets(connection: asyncpg.Connection, tenant_ids: Sequence[str]) -> list[Budget]:
    rows = await connection.fetch(
        "SELECT tenant_id, api_key_id, monthly_limit, hard, alerts FROM billing_budgets"
        " WHERE tenant_id = ANY($1::text[]) ORDER BY tenant_id, api_key_id",
        list(tenant_ids),
    )
    return [
        Budget(r["tenant_id"], r["api_key_id"], r["monthly_limit"], r["hard"], tuple(r["alerts"]))
        for r in rows
    ]


async def budgets_of(connection: asyncpg.Connection, tenant_id: str) -> list[Budget]:
    """The tenant's budgets: its own (``api_key_id`` '') first, then its keys'."""
    return await _budgets(connection, [tenant_id])


class BudgetTargetError(LookupError):
    """The budget's tenant or key does not exist (404)."""


async def set_budget(connection: asyncpg.Connection, budget: Budget) -> None:
    """Create or replace a budget; :class:`BudgetTargetError` for an unknown tenant or key."""
    async with connection.transaction():
        if not await tenant_exists(connection, budget.tenant_id):
            raise BudgetTargetError(f"no tenant {budget.tenant_id!r}")
        if budget.api_key_id:
            owner = await connection.fetchval(
                "SELECT tenant_id FROM api_keys WHERE key_id = $1", budget.api_key_id
            )
            if owner != budget.tenant_id:
                raise BudgetTargetError(
                    f"tenant {budget.tenant_id!r} has no API key {budget.api_key_id!r}"
                )
        await connection.execute(
            "INSERT INTO billing_budgets (tenant_id, api_key_id, monthly_limit, hard, alerts)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, api_key_id) DO UPDATE"
            " SET monthly_limit = EXCLUDED.monthly_limit, hard = EXCLUDED.hard,"
            " alerts = EXCLUDED.alerts, updated_at = now()",
            budget.tenant_id,
            budget.api_key_id,
            budget.monthly_limit,
            budget.hard,
            list(budget.alerts),
        )


@dataclass(frozen=True, slots=True)
class Held:
    """What live leases hold in a scope: in flight, answered but not yet charged, free."""

    reserved: Decimal = ZERO
    pending: Decimal = ZERO
    amount: Decimal = ZERO


async def held(connection: asyncpg.Connection, scopes: Sequence[str]) -> dict[str, Held]:
    """scope → what the live leases of every gateway hold in it."""
    rows = await connection.fetch(
        "SELECT scope, sum(reserved) AS reserved, sum(pending) AS pending, sum(amount) AS amount"
        " FROM billing_quota_leases WHERE scope = ANY($1::text[]) AND expires_at > now()"
        " GROUP BY scope",
        list(scopes),
    )
    return {r["scope"]: Held(r["reserved"], r["pending"], r["amount"]) for r in rows}


async def spent(connection: asyncpg.Connection, tenant_id: str, period: date) -> dict[str, Decimal]:
    """api_key_id ('' for the whole tenant) → spend in ``period``."""
    rows = await connection.fetch(
        "SELECT api_key_id, spent FROM billing_quota_spend WHERE tenant_id = $1 AND period = $2",
        tenant_id,
        period,
    )
    return {r["api_key_id"]: r["spent"] for r in rows}


# -- leases (the gateways) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """What limits a tenant's requests: its balance (when prepaid) and its hard budgets."""

    prepaid: bool
    budgets: dict[str, Budget] = field(default_factory=dict)
    """api_key_id ('' for the tenant) → hard budget."""


async def policy(
    connection: asyncpg.Connection, tenant_id: str, *, require_credits: bool
) -> Policy:
    prepaid = require_credits or bool(
        await connection.fetchval(
            "SELECT EXISTS (SELECT 1 FROM billing_credit_grants WHERE tenant_id = $1)", tenant_id
        )
    )
    hard = [b for b in await budgets_of(connection, tenant_id) if b.hard]
    return Policy(prepaid, {b.api_key_id: b for b in hard})


async def _cap(connection: asyncpg.Connection, scope: Scope) -> Decimal | None:
    """What the scope allows in all (``None``: it no longer limits anything)."""
    if scope.kind == "balance":
        return (await ledgers(connection, [scope.tenant_id]))[scope.tenant_id].balance
    row = await connection.fetchrow(
        "SELECT b.monthly_limit - coalesce(s.spent, 0) AS remaining FROM billing_budgets b"
        " LEFT JOIN billing_quota_spend s ON (s.tenant_id, s.api_key_id, s.period)"
        " = (b.tenant_id, b.api_key_id, $3) WHERE b.tenant_id = $1 AND b.api_key_id = $2"
        " AND b.hard",
        scope.tenant_id,
        scope.api_key_id,
        scope.period or date.min,
    )
    return None if row is None else row["remaining"]


@dataclass(frozen=True, slots=True)
class Refill:
    free: Decimal
    """The free headroom the lease now holds (beyond its reserved and pending)."""
    available: Decimal | None
    """What the scope had left beyond every lease before this refill (``None``: no limit)."""


async def refill(
    connection: asyncpg.Connection,
    *,
    holder: str,
    scope: Scope,
    reserved: Decimal,
    pending: Decimal,
    need: Decimal,
    recent: Decimal,
    ttl: timedelta,
) -> Refill:
    """Grow (or write afresh) ``holder``'s lease of ``scope`` from the scope's headroom.

    Under a transaction-scoped advisory lock of the scope, so two gateways refilling the
    same scope are serialised: the sum of the live leases never exceeds the cap.
    """
    async with connection.transaction():
        await lock_named(connection, scope.key)
        cap = await _cap(connection, scope)
        if cap is None:
            available = None
            free = max(need, recent * 4)
        else:
            others = await connection.fetchval(
                "SELECT coalesce(sum(amount), 0) FROM billing_quota_leases"
                " WHERE scope = $1 AND holder <> $2 AND expires_at > now()",
                scope.key,
                holder,
            )
            with localcontext(EXACT):
                available = cap - others - reserved - pending
            free = lease_free(need=need, recent=recent, available=available)
        await _write_leases(
            connection, holder, [(scope, reserved + pending + free, reserved, pending)], ttl
        )
    return Refill(free, available)


async def renew(
    connection: asyncpg.Connection,
    holder: str,
    leases: Sequence[tuple[Scope, Decimal, Decimal, Decimal]],
    dropped: Sequence[str],
    ttl: timedelta,
) -> set[str]:
    """Write ``holder``'s live leases as (scope, amount, reserved, pending) with a new expiry,
    delete the empty ones of ``dropped`` scopes; return the scopes renewed.

    Without the scopes' locks, so it writes only rows still live: an expired row no longer
    counts in its scope, and taking it back must go through :func:`refill`, under the lock,
    where the cap is checked. An amount renewed is at most what the last refill granted plus
    what answers cost beyond their reservations (spent already)."""
    renewed: set[str] = set()
    async with connection.transaction():
        if leases:
            rows = await connection.fetch(
                "UPDATE billing_quota_leases l SET amount = x.amount, reserved = x.reserved,"
                " pending = x.pending, expires_at = now() + $6::interval, updated_at = now()"
                " FROM unnest($2::text[], $3::numeric[], $4::numeric[], $5::numeric[])"
                " AS x(scope, amount, reserved, pending)"
                " WHERE l.holder = $1 AND l.scope = x.scope AND l.expires_at > now()"
                " RETURNING l.scope",
                holder,
                [scope.key for scope, _, _, _ in leases],
                [amount for _, amount, _, _ in leases],
                [reserved for _, _, reserved, _ in leases],
                [pending for _, _, _, pending in leases],
                ttl,
            )
            renewed = {r["scope"] for r in rows}
        if dropped:
            # Only if still empty: the same process may have taken the scope again since.
            await connection.execute(
                "DELETE FROM billing_quota_leases WHERE holder = $1"
                " AND scope = ANY($2::text[]) AND amount = 0",
                holder,
                list(dropped),
            )
    return renewed


async def _write_leases(
    connection: asyncpg.Connection,
    holder: str,
    leases: Sequence[tuple[Scope, Decimal, Decimal, Decimal]],
    ttl: timedelta,
) -> None:
    await connection.executemany(
        "INSERT INTO billing_quota_leases"
        " (scope, holder, tenant_id, amount, reserved, pending, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, now() + $7::interval)"
        " ON CONFLICT (scope, holder) DO UPDATE SET amount = EXCLUDED.amount,"
        " reserved = EXCLUDED.reserved, pending = EXCLUDED.pending,"
        " expires_at = EXCLUDED.expires_at, updated_at = now()",
        [
            (scope.key, holder, scope.tenant_id, amount, reserved, pending, ttl)
            for scope, amount, reserved, pending in leases
        ],
    )


async def release_all(connection: asyncpg.Connection, holder: str) -> None:
    """Hand back ``holder``'s free headroom (a gateway shutting down cleanly): each lease keeps
    only what answered requests not yet charged hold, until it expires."""
    await connection.execute(
        "DELETE FROM billing_quota_leases WHERE holder = $1 AND pending = 0", holder
    )
    await connection.execute(
        "UPDATE billing_quota_leases SET amount = pending, reserved = 0, updated_at = now()"
        " WHERE holder = $1",
        holder,
    )


async def settled(connection: asyncpg.Connection, request_ids: Sequence[str]) -> set[str]:
    """Which of ``request_ids`` the quota service has charged (any revision)."""
    rows = await connection.fetch(
        "SELECT DISTINCT request_id FROM billing_credit_charges WHERE request_id = ANY($1::text[])",
        list(request_ids),
    )
    return {r["request_id"] for r in rows}
