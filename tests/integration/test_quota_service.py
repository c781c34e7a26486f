"""The quota service (issue #11) against real PostgreSQL and a real broker: charges counted
once per (request_id, revision), spend per UTC month, budget and balance alerts once each,
expired grants posted once, the `billing quota` process SIGKILLed mid-stream, and signed
alert webhooks retried."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from multidict import CIMultiDict

from services.adapters.credits import add_grant
from services.adapters.database import create_pool, init_connection
from services.adapters.offsets import stored_offsets
from services.adapters.quota import (
    QUOTA_CONSUMER,
    ChargeResult,
    apply_charges,
    ledgers,
    list_alerts,
    post_expiries,
    set_budget,
    spent,
)
from services.adapters.tenants import create_key, create_tenant
from services.core.credits import grant_of
from services.core.events import (
    Breakdown,
    Position,
    QuotaAlert,
    UsageCounts,
    UsagePriced,
)
from services.core.periods import month_of
from services.core.pricebook import InMemoryPriceBook
from services.core.pricing import PRICE_KEYS
from services.core.quota import SIGNATURE_HEADER, budget_of, expired_remainder
from services.core.rating import rate
from services.quota.alerts import Webhook, deliver_webhooks, retry_delay
from tests.integration.pipeline import Pipeline, produce, read_records, until
from tests.integration.test_projector_apply import T0, recorded

pytestmark = pytest.mark.integration

D = Decimal
LOW = D("0.1")
TOPIC = "billing.costs.v1"
NOV = datetime(2026, 11, 10, 9, 0, tzinfo=UTC)
DEC = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
NOVEMBER, DECEMBER = date(2026, 11, 1), date(2026, 12, 1)


def priced(
    request_id: str,
    tenant_id: str,
    cost: Decimal | str,
    *,
    api_key_id: str | None = None,
    occurred_at: datetime = NOV,
    revision: int = 1,
    previous: Decimal | str = "0",
) -> UsagePriced:
    """A validated UsagePriced costing ``cost`` (``delta_cost`` = cost − previous)."""
    total, before = D(cost), D(previous)
    zero = D(0)
    return UsagePriced(
        request_id=request_id,
        tenant_id=tenant_id,
        api_key_id=api_key_id,
        provider="openrouter",
        provider_model_id="openai/gpt-5",
        model="openai/gpt-5",
        occurred_at=occurred_at,
        recorded_at=occurred_at + timedelta(seconds=1),
        usage=UsageCounts(prompt_tokens=10, uncached_input_tokens=10, completion_tokens=5),
        usage_source="upstream",
        breakdown=Breakdown(
            prompt_cost=total,
            cache_read_cost=zero,
            cache_write_cost=zero,
            completion_cost=zero,
            internal_reasoning_cost=zero,
            request_cost=zero,
            web_search_cost=zero,
            image_cost=zero,
            total_cost=total,
        ),
        total_cost=total,
        price_version=1,
        revision=revision,
        priced_at=occurred_at + timedelta(seconds=2),
        previous_total_cost=before,
        delta_cost=total - before,
        reason="priced" if revision == 1 else "re-rated",
    )


@dataclass
class Feed:
    """Hands batches to ``apply_charges`` as the service does: each message at the next
    offset of one partition, the batch's next offset stored with it."""

    connection: asyncpg.Connection
    partition: int = 0
    next_offset: int = 0
    log: list[UsagePriced] = field(default_factory=list)

    async def __call__(self, *events: UsagePriced) -> ChargeResult:
        positions = [
            Position(TOPIC, self.partition, self.next_offset + i) for i in range(len(events))
        ]
        self.next_offset += len(events)
        self.log.extend(events)
        return await apply_charges(
            self.connection,
            list(events),
            {(TOPIC, self.partition): self.next_offset},
            positions,
            low_fraction=LOW,
        )


@pytest.fixture
async def connection(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection (jsonb as text; the service's own codec is tested below)."""
    opened = await asyncpg.connect(database_url)
    try:
        yield opened
    finally:
        await opened.close()


async def alert_rows(connection: asyncpg.Connection) -> dict[str, dict[str, Any]]:
    rows = await connection.fetch("SELECT alert_id, event::text AS event FROM billing_alerts")
    return {r["alert_id"]: json.loads(r["event"]) for r in rows}


async def grant(connection: asyncpg.Connection, tenant_id: str, amount: str) -> int:
    row, new = await add_grant(
        connection, grant_of(tenant_id, amount, "top-up", now=datetime.now(UTC))
    )
    assert new
    return int(row["grant_id"])


# -- 1. charges ----------------------------------------------------------------------------------


async def test_each_revision_is_charged_once_and_a_lower_revision_refunds(
    connection: asyncpg.Connection,
) -> None:
    await create_tenant(connection, "acme")
    await grant(connection, "acme", "100")
    feed = Feed(connection)
    first = priced("r1", "acme", "10.5", api_key_id="k1")
    other = priced("r2", "acme", "0.000000001")  # no key: the tenant's spend only

    result = await feed(first, first, other)  # the same event twice in one batch
    assert (result.applied, result.duplicates) == (2, 1)
    again = await feed(first, other)  # and again in a later batch
    assert (again.applied, again.duplicates) == (0, 2)
    assert await connection.fetchval("SELECT count(*) FROM billing_credit_charges") == 2
    assert await spent(connection, "acme", NOVEMBER) == {
        "": D("10.500000001"),
        "k1": D("10.5"),
    }

    cheaper = priced("r1", "acme", "7.25", api_key_id="k1", revision=2, previous="10.5")
    assert cheaper.delta_cost == D("-3.25")
    assert (await feed(cheaper, first, cheaper)).applied == 1
    assert (await feed(cheaper)).applied == 0
    amounts = await connection.fetch(
        "SELECT request_id, revision, amount FROM billing_credit_charges ORDER BY 1, 2"
    )
    assert [tuple(r) for r in amounts] == [
        ("r1", 1, D("10.5")),
        ("r1", 2, D("-3.25")),
        ("r2", 1, D("0.000000001")),
    ]
    assert await spent(connection, "acme", NOVEMBER) == {"": D("7.250000001"), "k1": D("7.25")}
    ledger = (await ledgers(connection, ["acme"]))["acme"]
    assert ledger.charged == D("7.250000001")
    assert ledger.balance == D(100) - (D("10.5") - D("3.25") + D("0.000000001"))
    assert await stored_offsets(connection, QUOTA_CONSUMER, TOPIC) == {0: feed.next_offset}


async def test_spend_rolls_over_at_midnight_utc_on_the_first(
    connection: asyncpg.Connection,
) -> None:
    feed = Feed(connection)
    last_instant = datetime(2026, 11, 30, 23, 59, 59, 999999, tzinfo=UTC)
    first_instant = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
    berlin = timezone(timedelta(hours=1))
    await feed(
        priced("a", "acme", "1", api_key_id="k1", occurred_at=last_instant),
        priced("b", "acme", "2", api_key_id="k1", occurred_at=first_instant),
        # 00:30 on the 1st in Berlin is still 23:30 on the 30th in UTC: November.
        priced(
            "c",
            "acme",
            "4",
            api_key_id="k2",
            occurred_at=datetime(2026, 12, 1, 0, 30, tzinfo=berlin),
        ),
        priced("d", "acme", "8", occurred_at=datetime(2027, 1, 1, tzinfo=UTC)),
        priced("e", "zeta", "16", api_key_id="k1", occurred_at=first_instant),
    )
    rows = await connection.fetch(
        "SELECT tenant_id, api_key_id, period, spent FROM billing_quota_spend ORDER BY 1, 3, 2"
    )
    assert [tuple(r) for r in rows] == [
        ("acme", "", NOVEMBER, D(5)),
        ("acme", "k1", NOVEMBER, D(1)),
        ("acme", "k2", NOVEMBER, D(4)),
        ("acme", "", DECEMBER, D(2)),
        ("acme", "k1", DECEMBER, D(2)),
        ("acme", "", date(2027, 1, 1), D(8)),
        ("zeta", "", DECEMBER, D(16)),
        ("zeta", "k1", DECEMBER, D(16)),
    ]
    periods = await connection.fetch(
        "SELECT request_id, period FROM billing_credit_charges ORDER BY 1"
    )
    assert [r["period"] for r in periods] == [
        NOVEMBER,
        DECEMBER,
        NOVEMBER,
        date(2027, 1, 1),
        DECEMBER,
    ]
    # A revision moves the spend of the month its request occurred in.
    await feed(
        priced(
            "b", "acme", "0.5", api_key_id="k1", occurred_at=first_instant, revision=2, previous="2"
        )
    )
    assert await spent(connection, "acme", DECEMBER) == {"": D("0.5"), "k1": D("0.5")}


async def test_offsets_are_stored_and_events_below_them_are_fenced_out(
    connection: asyncpg.Connection,
) -> None:
    feed = Feed(connection)
    await feed(*(priced(f"r{n}", "acme", "1") for n in range(5)))
    assert await stored_offsets(connection, QUOTA_CONSUMER, TOPIC) == {0: 5}

    # A consumer still holding offsets 3 and 4 (a rebalance, a replay) after they committed:
    # a new request it carries at offset 3 is not charged, whatever it is.
    late = priced("late", "acme", "100")
    result = await apply_charges(
        connection,
        [late, priced("r4", "acme", "1")],
        {(TOPIC, 0): 5},
        [Position(TOPIC, 0, 3), Position(TOPIC, 0, 4)],
        low_fraction=LOW,
    )
    assert result.applied == 0
    assert (
        await connection.fetchval(
            "SELECT count(*) FROM billing_credit_charges WHERE request_id = 'late'"
        )
        == 0
    )
    # Only the partition's own offset fences: the next message, and other partitions, count.
    mixed = await apply_charges(
        connection,
        [late, priced("p1", "acme", "2"), priced("r0", "acme", "1")],
        {(TOPIC, 0): 6, (TOPIC, 1): 1},
        [Position(TOPIC, 0, 4), Position(TOPIC, 0, 5), Position(TOPIC, 1, 0)],
        low_fraction=LOW,
    )
    assert (mixed.applied, mixed.duplicates) == (1, 2)
    assert await stored_offsets(connection, QUOTA_CONSUMER, TOPIC) == {0: 6, 1: 1}
    # A stale batch never rewinds the stored offsets.
    await apply_charges(connection, [], {(TOPIC, 0): 2}, [], low_fraction=LOW)
    assert await stored_offsets(connection, QUOTA_CONSUMER, TOPIC) == {0: 6, 1: 1}
    assert await spent(connection, "acme", NOVEMBER) == {"": D(7)}


# -- 2. alerts -----------------------------------------------------------------------------------


async def test_budget_thresholds_alert_once_per_period(connection: asyncpg.Connection) -> None:
    await create_tenant(connection, "acme")
    key_id, _ = await create_key(connection, "acme", "ci")
    await set_budget(connection, budget_of("acme", "100"))
    await set_budget(connection, budget_of("acme", "200", api_key_id=key_id, hard=False))
    feed = Feed(connection)

    assert (await feed(priced("a", "acme", "30", api_key_id=key_id))).alerts == 0  # 30 %, key 15 %
    assert (await feed(priced("b", "acme", "25"))).alerts == 1  # 55 %
    assert (await feed(priced("c", "acme", "30", api_key_id=key_id))).alerts == 1  # 85 %, key 30 %
    assert (await feed(*feed.log)).alerts == 0  # a replay: nothing moves, nothing alerts
    assert (await feed(priced("d", "acme", "20"))).alerts == 1  # 105 %
    assert (await feed(priced("e", "acme", "1"))).alerts == 0  # already crossed
    # A refund below a threshold and spending above it again: still once.
    assert (await feed(priced("e", "acme", "0", revision=2, previous="1"))).alerts == 0
    assert (await feed(priced("f", "acme", "10"))).alerts == 0
    # The soft key budget crosses all three at once (110 → 260 of 200).
    assert (await feed(priced("g", "acme", "150", api_key_id=key_id))).alerts == 3
    assert (await feed(priced("h", "acme", "60", occurred_at=DEC))).alerts == 1  # a new month

    alerts = await alert_rows(connection)
    assert sorted(alerts) == sorted(
        [
            "budget/acme//2026-11/50",
            "budget/acme//2026-11/80",
            "budget/acme//2026-11/100",
            f"budget/acme/{key_id}/2026-11/50",
            f"budget/acme/{key_id}/2026-11/80",
            f"budget/acme/{key_id}/2026-11/100",
            "budget/acme//2026-12/50",
        ]
    )
    for alert_id, event in alerts.items():
        alert = QuotaAlert.model_validate(event)
        assert alert.alert_id == alert_id and alert.event_type == "BudgetThresholdCrossed"
        assert alert.tenant_id == "acme"
        assert alert.period == alert_id.split("/")[3]
        assert alert.threshold_percent == int(alert_id.split("/")[4])
        assert alert.spent is not None and alert.limit is not None
        assert alert.spent * 100 >= alert.limit * alert.threshold_percent
        if alert.api_key_id is None:
            assert (alert.hard, alert.limit) == (True, D(100))
        else:
            assert (alert.api_key_id, alert.hard, alert.limit) == (key_id, False, D(200))
    crossed = alerts["budget/acme//2026-11/50"]
    assert (crossed["spent"], crossed["limit"]) == ("55", "100")
    assert alerts["budget/acme//2026-12/50"]["spent"] == "60"
    assert await connection.fetchval("SELECT count(*) FROM billing_alerts") == 7


async def test_custom_thresholds_and_a_zero_budget(connection: asyncpg.Connection) -> None:
    await create_tenant(connection, "acme")
    await create_tenant(connection, "free")
    await set_budget(connection, budget_of("acme", "10", hard=False, alerts=[25, 150]))
    await set_budget(connection, budget_of("free", "0"))
    feed = Feed(connection)
    assert (await feed(priced("a", "acme", "2.5"), priced("z", "free", "0"))).alerts == 1
    assert (await feed(priced("b", "acme", "12.5"))).alerts == 1
    assert (await feed(priced("y", "free", "0.000000001"))).alerts == 3
    assert sorted(await alert_rows(connection)) == [
        "budget/acme//2026-11/150",
        "budget/acme//2026-11/25",
        "budget/free//2026-11/100",
        "budget/free//2026-11/50",
        "budget/free//2026-11/80",
    ]


async def test_balance_alerts_once_per_top_up(connection: asyncpg.Connection) -> None:
    await create_tenant(connection, "acme")
    first = await grant(connection, "acme", "100")
    feed = Feed(connection)

    assert (await feed(priced("a", "acme", "85"))).alerts == 0  # balance 15
    assert (await feed(priced("b", "acme", "6"))).alerts == 1  # 9 ≤ 10 % of 100
    assert (await feed(priced("c", "acme", "1"))).alerts == 0  # still low: once
    assert (await feed(priced("d", "acme", "10"))).alerts == 1  # -2: exhausted
    assert (await feed(priced("e", "acme", "1"))).alerts == 0
    second = await grant(connection, "acme", "50")  # balance 47, low at 15 now
    assert (await feed(priced("f", "acme", "1"))).alerts == 0  # 46
    assert (await feed(priced("g", "acme", "40"))).alerts == 1  # 6: low again, after the top-up
    assert (await feed(priced("h", "acme", "10"))).alerts == 1  # -4
    assert (await feed(priced("i", "acme", "10"))).alerts == 0

    alerts = await alert_rows(connection)
    assert sorted(alerts) == sorted(
        [
            f"BalanceLow/acme/after-grant-{first}",
            f"BalanceExhausted/acme/after-grant-{first}",
            f"BalanceLow/acme/after-grant-{second}",
            f"BalanceExhausted/acme/after-grant-{second}",
        ]
    )
    low = QuotaAlert.model_validate(alerts[f"BalanceLow/acme/after-grant-{first}"])
    assert (low.event_type, low.balance, low.granted) == ("BalanceLow", D(9), D(100))
    gone = QuotaAlert.model_validate(alerts[f"BalanceExhausted/acme/after-grant-{second}"])
    assert (gone.balance, gone.granted, gone.period, gone.api_key_id) == (D(-4), D(150), None, None)
    # A tenant without grants is not prepaid: no balance alerts, however much it spends.
    assert (await feed(priced("x", "postpaid", "1000"))).alerts == 0


async def test_alerts_are_stored_as_json_objects_on_a_service_connection(
    connection: asyncpg.Connection,
) -> None:
    await init_connection(connection)  # what create_pool does for every service connection
    await create_tenant(connection, "acme")
    await set_budget(connection, budget_of("acme", "1"))
    assert (await Feed(connection)(priced("a", "acme", "1"))).alerts == 3
    kinds = await connection.fetch("SELECT jsonb_typeof(event) AS kind FROM billing_alerts")
    listed = await list_alerts(connection, "acme")
    assert [r["kind"] for r in kinds] == ["object"] * 3
    assert all(isinstance(alert, dict) for alert in listed)


# -- 3. expiry -----------------------------------------------------------------------------------


async def expired_grant(
    connection: asyncpg.Connection, tenant_id: str, amount: str, expired_at: datetime
) -> int:
    """A grant already past its expiry (``grant_of`` refuses one: insert it as it would be
    after time passed)."""
    return int(
        await connection.fetchval(
            "INSERT INTO billing_credit_grants (tenant_id, amount, reason, expires_at,"
            " granted_at) VALUES ($1, $2, 'promo', $3, $3::timestamptz - interval '30 days')"
            " RETURNING grant_id",
            tenant_id,
            D(amount),
            expired_at,
        )
    )


async def test_an_expired_grant_leaves_what_first_expiring_spending_did_not_use(
    connection: asyncpg.Connection,
) -> None:
    now = datetime.now(UTC)
    await create_tenant(connection, "acme")
    promo = await expired_grant(connection, "acme", "30", now - timedelta(days=2))
    row, _ = await add_grant(
        connection,
        grant_of("acme", "50", "trial", expires_at=now + timedelta(days=10), now=now),
    )
    trial = int(row["grant_id"])
    await grant(connection, "acme", "20")  # never expires
    # Before its expiry is posted, the promo counts as gone entirely (it cannot be spent).
    assert (await ledgers(connection, ["acme"]))["acme"].balance == D(70)
    feed = Feed(connection)
    await feed(priced("a", "acme", "7"), priced("b", "acme", "5.5"))  # 12.5, after it expired

    assert await post_expiries(connection, now) == 1
    left = await connection.fetchval(
        "SELECT amount FROM billing_credit_expiries WHERE grant_id = $1", promo
    )
    # As of its expiry nothing had been spent (the charges came after): all 30 expired.
    assert left == expired_remainder(D(30), D(30), D(0)) == D(30)
    assert (await ledgers(connection, ["acme"]))["acme"].balance == D("57.5")
    assert await post_expiries(connection, now) == 0  # posted once
    assert await post_expiries(connection, now + timedelta(seconds=1)) == 0
    assert await connection.fetchval("SELECT count(*) FROM billing_credit_expiries") == 1

    # Ten days on the trial expires too. By then 57.5 had been charged: spending drew on
    # the trial (the first to expire of what was left) before the grant that never expires,
    # so the trial is used up and 12.5 of the permanent 20 remains.
    await feed(priced("c", "acme", "45"))
    later = now + timedelta(days=11)
    assert await post_expiries(connection, later) == 1
    left = await connection.fetchval(
        "SELECT amount FROM billing_credit_expiries WHERE grant_id = $1", trial
    )
    assert left == expired_remainder(D("12.5"), D(50), D(20)) == D(0)
    assert (await ledgers(connection, ["acme"]))["acme"].balance == D("12.5")
    assert await post_expiries(connection, later) == 0
    expiries = await connection.fetch(
        "SELECT grant_id, amount, expired_at FROM billing_credit_expiries ORDER BY grant_id"
    )
    assert [r["grant_id"] for r in expiries] == [promo, trial]
    assert expiries[1]["expired_at"] == now + timedelta(days=10)


async def test_what_an_expired_grant_leaves_is_reckoned_as_of_its_expiry(
    connection: asyncpg.Connection,
) -> None:
    """Charges applied after a grant expired do not eat into what it left (they were drawn
    from the grants still valid)."""
    now = datetime.now(UTC)
    await create_tenant(connection, "acme")
    await connection.execute(
        "INSERT INTO billing_credit_grants (tenant_id, amount, reason, expires_at, granted_at)"
        " VALUES ('acme', 10, 'a', $1, $2), ('acme', 10, 'b', NULL, $2)",
        now - timedelta(hours=1),
        now - timedelta(days=1),
    )
    await connection.execute(  # 3 charged before the expiry, 8 after
        "INSERT INTO billing_credit_charges (request_id, revision, tenant_id, period, amount,"
        " charged_at) VALUES ('r1', 1, 'acme', $1, 3, $2), ('r2', 1, 'acme', $1, 8, $3)",
        now.date().replace(day=1),
        now - timedelta(hours=2),
        now - timedelta(minutes=30),
    )
    assert await post_expiries(connection, now) == 1
    left = await connection.fetchval("SELECT amount FROM billing_credit_expiries")
    assert left == D(7)  # 10 - the 3 spent before it expired, not 10 - 11


async def test_overspent_expiring_grants_leave_nothing(connection: asyncpg.Connection) -> None:
    now = datetime.now(UTC)
    await create_tenant(connection, "acme")
    early = await expired_grant(connection, "acme", "10", now - timedelta(days=3))
    late = await expired_grant(connection, "acme", "10", now - timedelta(days=1))
    await grant(connection, "acme", "20")
    await Feed(connection)(priced("a", "acme", "15"), priced("b", "acme", "30"))  # -15
    # As if charged four days ago, before either expired: both were drawn on first.
    await connection.execute(
        "UPDATE billing_credit_charges SET charged_at = $1", now - timedelta(days=4)
    )

    assert await post_expiries(connection, now) == 2
    expiries = await connection.fetch(
        "SELECT grant_id, amount FROM billing_credit_expiries ORDER BY grant_id"
    )
    assert [tuple(r) for r in expiries] == [(early, D(0)), (late, D(0))]
    assert (await ledgers(connection, ["acme"]))["acme"].balance == D(-5)
    assert await post_expiries(connection, now) == 0


# -- 4. the `billing quota` process ---------------------------------------------------------------


def halved(book: InMemoryPriceBook) -> InMemoryPriceBook:
    """Every price (tiers' too) at half: a re-rating that lowers every cost."""

    def half(prices: Any) -> dict[str, Any]:
        return {k: prices[k] / 2 for k in PRICE_KEYS if prices.get(k) is not None}

    cheaper = InMemoryPriceBook()
    for model in book.models():
        pricing = book.lookup(model, T0).pricing
        halves = replace(
            pricing,
            **half({k: getattr(pricing, k) for k in PRICE_KEYS}),
            tiers=tuple(replace(t, prices=half(t.prices)) for t in pricing.tiers),
        )
        cheaper.record(model, halves, effective_from=T0 - timedelta(days=365))
    return cheaper


@dataclass
class Expected:
    """What the charges of some events must sum to, each (request_id, revision) once."""

    charges: dict[tuple[str, int], UsagePriced] = field(default_factory=dict)

    def add(self, events: list[UsagePriced]) -> None:
        for event in events:
            self.charges.setdefault((event.request_id, event.revision), event)

    def charged(self) -> dict[str, Decimal]:
        totals: dict[str, Decimal] = defaultdict(Decimal)
        for event in self.charges.values():
            totals[event.tenant_id] += event.delta_cost
        return dict(totals)

    def spend(self) -> dict[tuple[str, str, date], Decimal]:
        totals: dict[tuple[str, str, date], Decimal] = defaultdict(Decimal)
        for event in self.charges.values():
            month = month_of(event.occurred_at)
            totals[(event.tenant_id, "", month)] += event.delta_cost
            if event.api_key_id:
                totals[(event.tenant_id, event.api_key_id, month)] += event.delta_cost
        return dict(totals)


def wire(events: list[UsagePriced]) -> list[tuple[bytes, bytes | None]]:
    return [(e.tenant_id.encode(), e.model_dump_json().encode()) for e in events]


async def charges_count(database_url: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM billing_credit_charges"))
    finally:
        await connection.close()


async def exact(database_url: str, expected: Expected, grants: dict[str, Decimal]) -> bool:
    connection = await asyncpg.connect(database_url)
    try:
        count = await connection.fetchval("SELECT count(*) FROM billing_credit_charges")
        balances = await ledgers(connection, grants)
        rows = await connection.fetch(
            "SELECT tenant_id, api_key_id, period, spent FROM billing_quota_spend"
        )
    finally:
        await connection.close()
    charged = expected.charged()
    return (
        count == len(expected.charges)
        and {t: b.balance for t, b in balances.items()}
        == {t: grants[t] - charged.get(t, D(0)) for t in grants}
        and {(r[0], r[1], r[2]): r[3] for r in rows} == expected.spend()
    )


async def assert_exact(pipeline: Pipeline, expected: Expected, grants: dict[str, Decimal]) -> None:
    try:
        await until(lambda: exact(pipeline.database_url, expected, grants), timeout=45)
    except TimeoutError:
        pytest.fail(f"balances never matched\n--- quota\n{pipeline.log('quota')}")


async def test_quota_process_killed_mid_stream_charges_each_revision_once(
    pipeline: Pipeline, snapshot_book: InMemoryPriceBook
) -> None:
    tenants = ["tenant-0", "tenant-1", "tenant-2"]
    grants = {t: D(1000) for t in tenants}
    connection = await asyncpg.connect(pipeline.database_url)
    try:
        for tenant_id in tenants:
            await create_tenant(connection, tenant_id)
            await grant(connection, tenant_id, "1000")
    finally:
        await connection.close()
    rng = random.Random(17)
    facts = [recorded(n, rng) for n in range(3300)]
    cheaper = halved(snapshot_book)
    first = [rate(f, snapshot_book, priced_at=T0) for f in facts[:300]]
    revised = [
        rate(f, cheaper, priced_at=T0, revision=2, previous_total=p.total_cost, reason="fix")
        for f, p in zip(facts[:60], first[:60], strict=True)
    ]
    assert all(r.delta_cost < 0 for r in revised)
    expected = Expected()

    # Duplicates and re-ratings that lower the cost, shuffled (one tenant's keep their order
    # per partition; duplicates may come anywhere).
    deliveries = first * 2 + revised * 2
    rng.shuffle(deliveries)
    await produce(pipeline.bootstrap, pipeline.topics.costs, wire(deliveries))
    expected.add(deliveries)
    pipeline.start("quota")
    await assert_exact(pipeline, expected, grants)

    # A few thousand more, the process SIGKILLed at the first sign of progress on them.
    more = [rate(f, snapshot_book, priced_at=T0) for f in facts[300:]]
    stream = more + rng.sample(more, 300)  # some delivered twice
    expected.add(stream)
    before = len(expected.charges) - len(more)

    async def producing() -> None:
        for start in range(0, len(stream), 150):
            await produce(
                pipeline.bootstrap, pipeline.topics.costs, wire(stream[start : start + 150])
            )

    task = asyncio.create_task(producing())
    try:
        async with asyncio.timeout(30):
            while await charges_count(pipeline.database_url) <= before:
                await asyncio.sleep(0.05)
    finally:
        pipeline.kill("quota")
    done = await charges_count(pipeline.database_url)
    await task
    assert done < len(expected.charges), "killed too late to prove anything"
    pipeline.start("quota")
    await assert_exact(pipeline, expected, grants)

    connection = await asyncpg.connect(pipeline.database_url)
    try:

        async def everything_consumed() -> bool:
            offsets = await stored_offsets(connection, QUOTA_CONSUMER, pipeline.topics.costs)
            return sum(offsets.values()) == len(deliveries) + len(stream)

        await until(everything_consumed, timeout=20)
        repeated = await connection.fetchval(
            "SELECT count(*) FROM (SELECT request_id FROM billing_credit_charges"
            " GROUP BY request_id HAVING count(*) > 1) x"
        )
    finally:
        await connection.close()
    assert await exact(pipeline.database_url, expected, grants)  # nothing added since
    assert repeated == len(revised)


async def published_alerts(pipeline: Pipeline, count: int) -> list[tuple[str, str]]:
    connection = await asyncpg.connect(pipeline.database_url)
    try:

        async def all_published() -> bool:
            published = await connection.fetchval(
                "SELECT count(*) FROM billing_alerts WHERE published_at IS NOT NULL"
            )
            return bool(published == count)

        try:
            await until(all_published, timeout=30)
        except TimeoutError:
            pytest.fail(f"alerts never published\n--- quota\n{pipeline.log('quota')}")
        rows = await connection.fetch("SELECT alert_id, tenant_id FROM billing_alerts")
    finally:
        await connection.close()
    return [(r["alert_id"], r["tenant_id"]) for r in rows]


async def test_alerts_land_on_the_alerts_topic_with_their_alert_ids(pipeline: Pipeline) -> None:
    connection = await asyncpg.connect(pipeline.database_url)
    try:
        await create_tenant(connection, "acme")
        await set_budget(connection, budget_of("acme", "10"))
        first_grant = await grant(connection, "acme", "15")
    finally:
        await connection.close()
    events = [priced(f"r{n}", "acme", "1", api_key_id="k1") for n in range(20)]
    await produce(pipeline.bootstrap, pipeline.topics.costs, wire(events + events[:5]))
    pipeline.start("quota")
    rows = await published_alerts(pipeline, 5)
    assert sorted(alert_id for alert_id, _ in rows) == sorted(
        [
            "budget/acme//2026-11/50",
            "budget/acme//2026-11/80",
            "budget/acme//2026-11/100",
            f"BalanceLow/acme/after-grant-{first_grant}",
            f"BalanceExhausted/acme/after-grant-{first_grant}",
        ]
    )
    records = await read_records(pipeline.bootstrap, pipeline.topics.alerts, 5)
    assert len(records) >= 5  # at least once
    assert {r.key for r in records} == {b"acme"}
    alerts = [QuotaAlert.model_validate_json(r.value) for r in records]
    assert {a.alert_id for a in alerts} == {alert_id for alert_id, _ in rows}
    assert Counter(a.event_type for a in alerts)["BudgetThresholdCrossed"] >= 3


# -- 5. webhooks ---------------------------------------------------------------------------------


@dataclass
class Receiver:
    """A webhook endpoint answering 500 to the first ``failures`` deliveries, then 204."""

    failures: int
    calls: list[tuple[float, CIMultiDict[str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.calls.append((time.monotonic(), CIMultiDict(request.headers), body))
        return web.Response(status=500 if len(self.calls) <= self.failures else 204)


@pytest.fixture
async def receiver_url() -> AsyncIterator[tuple[str, list[Receiver]]]:
    receivers: list[Receiver] = []

    async def dispatch(request: web.Request) -> web.Response:
        return await receivers[0].handle(request)

    app = web.Application()
    app.router.add_post("/hook", dispatch)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/hook", receivers
    finally:
        await runner.cleanup()


async def one_alert(connection: asyncpg.Connection) -> str:
    await create_tenant(connection, "acme")
    await set_budget(connection, budget_of("acme", "10", alerts=[100]))
    await Feed(connection)(priced("a", "acme", "10"))
    event = await connection.fetchval("SELECT event::text FROM billing_alerts")
    return str(event)


async def deliver_until(
    database_url: str, webhook: Webhook, done: str, timeout: float = 10.0
) -> None:
    pool = await create_pool(database_url)
    stop = asyncio.Event()
    task = asyncio.create_task(deliver_webhooks(pool, webhook, stop, poll_seconds=0.05))
    try:

        async def finished() -> bool:
            async with pool.acquire() as connection:
                return bool(
                    await connection.fetchval(f"SELECT bool_and({done}) FROM billing_alerts")
                )

        await until(finished, timeout=timeout)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await pool.close()


async def test_a_failed_webhook_is_retried_soon_and_signed(
    connection: asyncpg.Connection, database_url: str, receiver_url: tuple[str, list[Receiver]]
) -> None:
    url, receivers = receiver_url
    receivers.append(Receiver(failures=1))
    stored = await one_alert(connection)
    webhook = Webhook(url, "wh-s3cret", first_retry_seconds=0.1)
    assert retry_delay(webhook, 1) == 0.1 and retry_delay(webhook, 3) == 0.4
    assert retry_delay(webhook, 40) == 3600

    await deliver_until(database_url, webhook, "webhook_done_at IS NOT NULL")
    row = await connection.fetchrow(
        "SELECT webhook_attempts, webhook_error, webhook_next_at, webhook_done_at"
        " FROM billing_alerts"
    )
    assert row["webhook_attempts"] == 2
    assert row["webhook_error"] is None and row["webhook_done_at"] is not None
    calls = receivers[0].calls
    assert len(calls) == 2
    assert calls[1][0] - calls[0][0] < 1.5  # the first retry came after ~0.1 s, not 2 s
    for _, headers, body in calls:
        assert body == stored.encode()
        assert headers["Content-Type"] == "application/json"
        signature = dict(part.split("=", 1) for part in headers[SIGNATURE_HEADER].split(","))
        t = int(signature["t"])
        assert abs(time.time() - t) < 60
        mac = hmac.new(b"wh-s3cret", f"{t}.".encode() + body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(signature["v1"], mac)
    alert = QuotaAlert.model_validate_json(calls[0][2])
    assert alert.alert_id == "budget/acme//2026-11/100"

    # Delivered: never sent again.
    pool = await create_pool(database_url)
    stop = asyncio.Event()
    task = asyncio.create_task(deliver_webhooks(pool, webhook, stop, poll_seconds=0.05))
    await asyncio.sleep(0.4)
    stop.set()
    await asyncio.wait_for(task, 10)
    await pool.close()
    assert len(receivers[0].calls) == 2


async def test_a_webhook_is_abandoned_after_max_attempts(
    connection: asyncpg.Connection, database_url: str, receiver_url: tuple[str, list[Receiver]]
) -> None:
    url, receivers = receiver_url
    receivers.append(Receiver(failures=1000))
    await one_alert(connection)
    webhook = Webhook(url, "s", max_attempts=3, first_retry_seconds=0.05)
    await deliver_until(database_url, webhook, "webhook_attempts >= 3")
    await asyncio.sleep(0.3)
    row = await connection.fetchrow(
        "SELECT webhook_attempts, webhook_error, webhook_next_at, webhook_done_at"
        " FROM billing_alerts"
    )
    assert row["webhook_attempts"] == 3
    assert row["webhook_error"] == "HTTP 500"
    assert row["webhook_done_at"] is None and row["webhook_next_at"] is None
    assert len(receivers[0].calls) == 3
