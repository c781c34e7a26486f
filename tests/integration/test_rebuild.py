"""``billing rebuild`` against a live state made by the real projector process.

``UsagePriced`` events (several tenants, models and days, revisions 2 and 3 out of order,
redeliveries, a re-priced duplicate, garbage) go straight onto the cost topic; the projector
runs as ``billing projector``; ``billing rebuild`` runs as a subprocess with the pipeline's
environment. Rows are compared on every column but ``projected_at`` / ``updated_at``. The
requests of ``history`` occurred about three days ago, whatever the day, so their minutes are
among those kept (``MINUTES_KEPT_DAYS``) and re-derived.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from services.adapters.database import init_connection
from services.adapters.partitions import retire
from services.adapters.readmodels import (
    SUMMARY_VALUES,
    minute_key,
    summary_key,
    transaction_row,
)
from services.adapters.spend_minutes import KEPT
from services.core.events import UsagePriced, UsageRecorded
from services.core.periods import add_months, month_of
from services.core.pricebook import InMemoryPriceBook
from services.core.rating import rate
from services.jobs import rebuild_reader
from services.jobs.rebuild import SUMMARY_KEY_SQL, RebuildError, rebuild
from services.jobs.rebuild_tables import MINUTE_KEY_SQL
from tests.integration.pipeline import BILLING, Pipeline, produce
from tests.integration.test_projector_apply import T0, recorded

pytestmark = pytest.mark.integration

Rows = dict[tuple[Any, ...], dict[str, Any]]
SHIFT = timedelta(days=(datetime.now(UTC) - T0).days - 3)
"""Whole days from ``T0`` to about three days ago (days and summary keys keep their shape)."""


def recent(n: int, rng: random.Random) -> UsageRecorded:
    """``recorded(n, rng)``, occurred ``SHIFT`` later."""
    fact = recorded(n, rng)
    return fact.model_copy(
        update={
            "occurred_at": fact.occurred_at + SHIFT,
            "recorded_at": fact.recorded_at + SHIFT,
        }
    )


def scaled(
    book: InMemoryPriceBook, factor: Decimal, since: datetime = T0 - timedelta(days=365)
) -> InMemoryPriceBook:
    """A book whose prompt and completion prices are ``factor`` times ``book``'s, in effect
    from ``since``."""
    other = InMemoryPriceBook()
    for model in book.models():
        pricing = book.lookup(model, T0).pricing
        cheaper = pricing.__class__(
            prompt=pricing.prompt * factor, completion=pricing.completion * factor
        )
        other.record(model, cheaper, effective_from=since)
    return other


def history(book: InMemoryPriceBook, first: int, count: int) -> list[UsagePriced]:
    """Requests ``first…first+count``: every one priced (and delivered) twice, every fifth
    re-priced at revision 1 an hour later (a pricer crash), every fourth re-rated to
    revision 2 and every eighth to 3 (its revision 3 sent before its 2); no api key on
    every seventh."""
    rng = random.Random(first)
    second, third = scaled(book, Decimal("0.5")), scaled(book, Decimal("1.25"))
    events: list[UsagePriced] = []
    for n in range(first, first + count):
        fact = recent(n, rng)
        if n % 7 == 0:
            fact = fact.model_copy(update={"api_key_id": None})
        one = rate(fact, book, priced_at=T0)
        events += [one, one]
        if n % 5 == 0:
            events.append(rate(fact, book, priced_at=T0 + timedelta(hours=1)))
        two = rate(fact, second, priced_at=T0, revision=2, previous_total=one.total_cost)
        if n % 8 == 0:
            events.append(
                rate(fact, third, priced_at=T0, revision=3, previous_total=two.total_cost)
            )
        if n % 4 == 0:
            events.append(two)
    return events


def encoded(events: list[UsagePriced], seed: int = 2) -> list[tuple[bytes, bytes | None]]:
    values: list[tuple[bytes, bytes | None]] = [
        (e.tenant_id.encode(), e.model_dump_json().encode()) for e in events
    ]
    random.Random(seed).shuffle(values)  # one request's events stay on one partition
    return values


async def committed(pipeline: Pipeline) -> int:
    connection = await asyncpg.connect(pipeline.database_url)
    try:
        return int(
            await connection.fetchval(
                "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets"
                " WHERE consumer = 'projector' AND topic = $1",
                pipeline.topics.costs,
            )
        )
    finally:
        await connection.close()


async def wait_committed(pipeline: Pipeline, records: int, timeout: float = 60.0) -> None:
    """Until the projector has committed ``records`` records of the cost topic."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (done := await committed(pipeline)) < records:
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"projector committed {done}/{records}\n{pipeline.log('projector')}")
        await asyncio.sleep(0.2)


async def read_models(url: str) -> tuple[Rows, Rows, Rows]:
    """(transactions by request_id, summary by key, minutes by key), without projected_at /
    updated_at and emptied groups (the rebuild's definition of equal)."""
    connection = await asyncpg.connect(url)
    await init_connection(connection)
    try:
        transactions = {
            (r["request_id"],): {k: v for k, v in r.items() if k != "projected_at"}
            for r in await connection.fetch("SELECT * FROM billing_transactions")
        }
        summary = {
            (r["tenant_id"], r["day"], r["model"], r["api_key_id"]): {
                k: v for k, v in r.items() if k != "updated_at"
            }
            for r in await connection.fetch("SELECT * FROM tenant_billing_summary")
            if any(r[c] != 0 for c in SUMMARY_VALUES)  # an emptied group is no group
        }
        minutes = {
            (r["tenant_id"], r["minute"]): dict(r)
            for r in await connection.fetch("SELECT * FROM billing_spend_minutes")
            if r["requests"] != 0 or r["total_cost"] != 0
        }
    finally:
        await connection.close()
    return transactions, summary, minutes


def kept_minutes(minutes: Rows) -> Rows:
    """The minutes the rebuild re-derives (younger than ``MINUTES_KEPT_DAYS``)."""
    since = datetime.now(UTC) - KEPT
    return {key: row for key, row in minutes.items() if key[1] >= since}


def minutes_of(transactions: Rows) -> Rows:
    """The kept minutes as the aggregate of ``transactions`` (``readmodels.minute_key``)."""
    minutes: Rows = {}
    for row in transactions.values():
        tenant_id, minute = key = (
            row["tenant_id"],
            row["occurred_at"].replace(second=0, microsecond=0),
        )
        held = minutes.setdefault(
            key, {"tenant_id": tenant_id, "minute": minute, "requests": 0, "total_cost": 0}
        )
        held["requests"] += 1
        held["total_cost"] += row["total_cost"]
    return kept_minutes(minutes)


async def run_rebuild(pipeline: Pipeline, *args: str) -> tuple[int, dict[str, Any], str]:
    """``billing rebuild ARGS`` as a subprocess: (exit status, its JSON report, stdout)."""
    done = await asyncio.to_thread(
        subprocess.run,
        [BILLING, "rebuild", *args],
        env=pipeline.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, ValueError):
        pytest.fail(f"no report (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.returncode, report, done.stdout


async def catalogue(url: str) -> tuple[set[str], list[tuple[str, str, bool]], set[str]]:
    """(indexes of the read models and of their partitions, foreign keys of
    billing_adjustments, tables)."""
    connection = await asyncpg.connect(url)
    try:
        indexes = {
            r["indexname"]
            for r in await connection.fetch(
                "SELECT indexname FROM pg_indexes WHERE tablename = ANY($1::text[])"
                " OR tablename LIKE 'billing\\_transactions\\_y%'",
                ["billing_transactions", "tenant_billing_summary", "billing_spend_minutes"],
            )
        }
        keys = [
            (r["conname"], r["target"], r["convalidated"])
            for r in await connection.fetch(
                "SELECT conname, confrelid::regclass::text AS target, convalidated"
                " FROM pg_constraint WHERE conrelid = 'billing_adjustments'::regclass"
                " AND contype = 'f'"
            )
        ]
        tables = {
            r["tablename"]
            for r in await connection.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        }
    finally:
        await connection.close()
    return indexes, keys, tables


def grantees(acl: asyncpg.Record) -> dict[str, str]:
    """Grants other than the owner's, from (relacl, owner): grantee (or PUBLIC) → rights."""
    entries = [item.split("/")[0].split("=") for item in acl["acl"] or []]
    return {who or "PUBLIC": what for who, what in entries if who != acl["owner"]}


async def test_rebuild_equals_the_live_models_and_the_projector_goes_on(
    pipeline: Pipeline, snapshot_book: InMemoryPriceBook
) -> None:
    events = history(snapshot_book, 0, 120)
    values = [*encoded(events), (b"tenant-0", b"\x00 not an event")]
    await produce(pipeline.bootstrap, pipeline.topics.costs, values)
    pipeline.start("projector")
    await wait_committed(pipeline, len(values))
    old = (datetime.now(UTC) - KEPT - timedelta(days=5)).replace(second=0, microsecond=0)
    connection = await asyncpg.connect(pipeline.database_url)
    try:  # an old minute the projector has not pruned yet (it prunes hourly)
        await connection.execute(
            "INSERT INTO billing_spend_minutes VALUES ('tenant-0', $1, 2, 0.5)", old
        )
    finally:
        await connection.close()
    live = await read_models(pipeline.database_url)
    before = await catalogue(pipeline.database_url)
    assert len(live[0]) == 120
    assert len(live[2]) > 100 and kept_minutes(live[2]) == minutes_of(live[0])
    assert {r["revision"] for r in live[0].values()} == {1, 2, 3}
    assert any(r["api_key_id"] is None for r in live[0].values())
    assert len({k[1] for k in live[1]}) >= 2  # several UTC days

    status, report, out = await run_rebuild(pipeline, "--dry-run")
    assert status == 0, out
    assert report["equal"] and not report["swapped"]
    assert report["records_read"] == len(values)
    assert report["undecodable"] == 1
    assert report["transactions"] == 120
    assert report["summary_rows"] == len(live[1])
    winners: dict[str, int] = {}
    for event in events:
        winners[event.request_id] = max(winners.get(event.request_id, 0), event.revision)
    superseded = sum(1 for e in events if e.revision < winners[e.request_id])
    assert report["revisions_superseded"] == superseded
    assert report["duplicates"] == len(events) - 120 - superseded
    assert report["stop"] == "projector offsets"
    assert await read_models(pipeline.database_url) == live  # a dry run changes nothing

    status, report, out = await run_rebuild(pipeline)
    assert status == 0, out
    assert report["swapped"] and report["equal"] and report["kept"] == []
    assert await read_models(pipeline.database_url) == live  # the old minute as it was too
    assert ("tenant-0", old) in live[2]
    after = await catalogue(pipeline.database_url)
    assert after[0] == before[0]  # the same index (and constraint) names, partitions' too
    assert any("_y20" in name for name in after[0])
    assert after[1] == before[1] == []  # migration 005: adjustments outlive retired months
    assert after[2] == before[2]  # the same partitions, nothing left behind
    connection = await asyncpg.connect(pipeline.database_url)
    try:
        adjustments = await connection.fetchval("SELECT count(*) FROM billing_adjustments")
    finally:
        await connection.close()

    # The projector (same process, same cached statements) keeps folding into the new tables.
    later = history(snapshot_book, 120, 30)
    dearer = scaled(snapshot_book, Decimal(2))
    revised = [
        rate(recent(n, random.Random(0)), dearer, priced_at=T0, revision=4, reason="later")
        for n in (1, 2, 3)
    ]
    more = encoded([*later, *revised], seed=5)
    await produce(pipeline.bootstrap, pipeline.topics.costs, more)
    await wait_committed(pipeline, len(values) + len(more))
    transactions, _, minutes = await read_models(pipeline.database_url)
    assert len(transactions) == 150
    assert kept_minutes(minutes) == minutes_of(transactions)
    assert [transactions[(f"req-{n}",)]["revision"] for n in (1, 2, 3)] == [4, 4, 4]
    connection = await asyncpg.connect(pipeline.database_url)
    try:
        assert (
            await connection.fetchval(
                "SELECT count(*) FROM billing_adjustments WHERE reason = 'later'"
            )
            == 3
        )
        assert await connection.fetchval("SELECT count(*) FROM billing_adjustments") > adjustments
    finally:
        await connection.close()
    status, report, out = await run_rebuild(pipeline, "--dry-run")
    assert status == 0 and report["equal"], out  # the deltas still add up to the fold


async def test_a_tampered_summary_and_minute_are_found_and_repaired(
    pipeline: Pipeline, snapshot_book: InMemoryPriceBook
) -> None:
    values = encoded(history(snapshot_book, 0, 40))
    await produce(pipeline.bootstrap, pipeline.topics.costs, values)
    pipeline.start("projector")
    await wait_committed(pipeline, len(values))
    live = await read_models(pipeline.database_url)
    connection = await asyncpg.connect(pipeline.database_url)
    try:
        key = await connection.fetchrow(
            "UPDATE tenant_billing_summary SET total_cost = total_cost + 1, requests = requests + 1"
            " WHERE (tenant_id, day, model, api_key_id) = (SELECT tenant_id, day, model,"
            " api_key_id FROM tenant_billing_summary ORDER BY 1, 2, 3, 4 LIMIT 1)"
            " RETURNING tenant_id, day, model, api_key_id, total_cost"
        )
        await connection.execute("GRANT SELECT ON tenant_billing_summary TO PUBLIC")
        minute = await connection.fetchrow(
            "UPDATE billing_spend_minutes SET requests = requests + 2 WHERE (tenant_id, minute)"
            " = (SELECT tenant_id, minute FROM billing_spend_minutes ORDER BY 2, 1 LIMIT 1)"
            " RETURNING tenant_id, minute, requests"
        )
        await connection.execute("GRANT SELECT ON billing_spend_minutes TO PUBLIC")
    finally:
        await connection.close()

    status, report, out = await run_rebuild(pipeline, "--dry-run")
    assert status == 1, out
    assert not report["equal"] and not report["swapped"]
    assert f"({key['tenant_id']}, {key['day']}, {key['model']}, {key['api_key_id']})" in out
    assert f"total_cost live {key['total_cost']} rebuilt" in out
    assert "billing_transactions: live 40 rows / rebuilt 40; " in out
    minutes = len(live[2])
    assert f"billing_spend_minutes: live {minutes} rows / rebuilt {minutes}; " in out
    assert (
        "; requests 42 / 40; 1 live rows not in the rebuilt table, "
        "1 rebuilt rows not in the live one"
    ) in out
    assert (
        f"({minute['tenant_id']}, {minute['minute']}): requests live {minute['requests']}"
        f" rebuilt {minute['requests'] - 2}"
    ) in out

    status, report, out = await run_rebuild(pipeline, "--keep-old")
    assert status == 0, out
    assert report["swapped"] and not report["equal"]  # what it repaired
    assert await read_models(pipeline.database_url) == live
    (kept_summary,) = [t for t in report["kept"] if t.startswith("tenant_billing_summary")]
    (kept_minutes_table,) = [t for t in report["kept"] if t.startswith("billing_spend_minutes")]
    connection = await asyncpg.connect(pipeline.database_url)
    try:
        tampered = await connection.fetchval(
            f"SELECT total_cost FROM {kept_summary} WHERE tenant_id = $1 AND day = $2"
            " AND model = $3 AND api_key_id = $4",
            key["tenant_id"],
            key["day"],
            key["model"],
            key["api_key_id"],
        )
        tampered_requests = await connection.fetchval(
            f"SELECT requests FROM {kept_minutes_table} WHERE tenant_id = $1 AND minute = $2",
            minute["tenant_id"],
            minute["minute"],
        )
        acls = [
            await connection.fetchrow(
                "SELECT relacl::text[] AS acl, pg_get_userbyid(relowner) AS owner FROM pg_class"
                " WHERE oid = $1::regclass",
                table,
            )
            for table in ("tenant_billing_summary", "billing_spend_minutes")
        ]
    finally:
        await connection.close()
    assert tampered == key["total_cost"]
    assert tampered_requests == minute["requests"]
    for acl in acls:  # the grants went over to the new tables
        assert grantees(acl) == {"PUBLIC": "r"}
    status, report, out = await run_rebuild(pipeline, "--dry-run")  # and the next one works
    assert status == 0 and report["equal"], out


async def test_without_projector_offsets_it_reads_to_the_end_and_stores_them(
    pipeline: Pipeline, snapshot_book: InMemoryPriceBook
) -> None:
    values = encoded(history(snapshot_book, 0, 50))
    await produce(pipeline.bootstrap, pipeline.topics.costs, values)
    status, report, out = await run_rebuild(pipeline, "--idle-seconds", "1")
    assert status == 0, out
    assert report["stop"] == "end of log" and report["swapped"]
    assert report["records_read"] == len(values) == sum(report["offsets"].values())
    assert await committed(pipeline) == len(values)
    transactions, _, _ = await read_models(pipeline.database_url)
    assert len(transactions) == 50

    pipeline.start("projector")  # goes on from the stored offsets
    revised = rate(recent(1, random.Random(0)), snapshot_book, priced_at=T0, revision=6)
    more = encoded([*history(snapshot_book, 50, 5), revised])
    await produce(pipeline.bootstrap, pipeline.topics.costs, more)
    await wait_committed(pipeline, len(values) + len(more))
    connection = await asyncpg.connect(pipeline.database_url)
    try:
        assert await connection.fetchval("SELECT count(*) FROM billing_transactions") == 55
        assert (  # the row the rebuild wrote, re-rated by the projector
            await connection.fetchval(
                "SELECT old_revision FROM billing_adjustments WHERE new_revision = 6"
            )
            == 1
        )
    finally:
        await connection.close()
    status, report, out = await run_rebuild(pipeline, "--dry-run")
    assert status == 0 and report["equal"], out


async def test_records_committed_during_the_read_are_folded_in_under_the_lock(
    pipeline: Pipeline, snapshot_book: InMemoryPriceBook
) -> None:
    values = encoded(history(snapshot_book, 0, 60))
    await produce(pipeline.bootstrap, pipeline.topics.costs, values)
    pipeline.start("projector")
    await wait_committed(pipeline, len(values))
    dearer = scaled(snapshot_book, Decimal(3))
    fact = recent(1, random.Random(0))
    moved = fact.model_copy(update={"occurred_at": fact.occurred_at + timedelta(minutes=7)})
    meanwhile = encoded(
        [
            *history(snapshot_book, 60, 10),  # new requests
            *(  # and re-ratings of old ones, some onto other keys' rows
                rate(recent(n, random.Random(0)), dearer, priced_at=T0, revision=5)
                for n in range(0, 60, 6)
            ),
            rate(moved, dearer, priced_at=T0, revision=5),  # req-1 to another minute
        ],
        seed=9,
    )
    state: dict[str, Any] = {}

    async def projector_moves_on() -> None:
        await produce(pipeline.bootstrap, pipeline.topics.costs, meanwhile)
        await wait_committed(pipeline, len(values) + len(meanwhile))
        state["live"] = await read_models(pipeline.database_url)
        connection = await asyncpg.connect(pipeline.database_url)
        try:  # req-0 and req-42 moved from api key '' to key-0: their old group is empty
            state["emptied"] = await connection.fetchval(
                "SELECT count(*) FROM tenant_billing_summary WHERE requests = 0 AND total_cost = 0"
            )
            state["emptied_minute"] = await connection.fetchval(  # req-1's old minute
                "SELECT requests = 0 AND total_cost = 0 FROM billing_spend_minutes"
                " WHERE tenant_id = $1 AND minute = $2",
                *minute_key(transaction_row(rate(fact, dearer, priced_at=T0))),
            )
        finally:
            await connection.close()

    connection = await asyncpg.connect(pipeline.database_url)
    await init_connection(connection)
    try:
        report = await rebuild(
            pipeline.bootstrap, connection, pipeline.topics.costs, before_lock=projector_moves_on
        )
    finally:
        await connection.close()
    assert report.caught_up == len(meanwhile)
    assert report.records_read == len(values) + len(meanwhile)
    assert report.swapped and report.equal, [d.lines() for d in report.diffs]
    assert await read_models(pipeline.database_url) == state["live"]
    assert len(state["live"][0]) == 70
    assert state["emptied"] >= 1  # left out of the comparison, and gone after the swap
    assert state["emptied_minute"]
    transactions, _, minutes = state["live"]
    assert kept_minutes(minutes) == minutes_of(transactions)
    new_minute = minute_key(transaction_row(rate(moved, dearer, priced_at=T0)))
    assert minutes[new_minute]["requests"] == 1
    assert minutes[new_minute]["total_cost"] == transactions[("req-1",)]["total_cost"]


async def test_refusals_change_nothing(
    pipeline: Pipeline, snapshot_book: InMemoryPriceBook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second rebuild, readers holding the tables past the lock timeout, and offsets the
    log does not reach (a broker that lost its log) each fail with the tables untouched."""
    values = encoded(history(snapshot_book, 0, 30))
    await produce(pipeline.bootstrap, pipeline.topics.costs, values)
    status, _, out = await run_rebuild(pipeline, "--idle-seconds", "0.5")
    assert status == 0, out
    live = await read_models(pipeline.database_url)
    tables = (await catalogue(pipeline.database_url))[2]
    monkeypatch.setattr(rebuild_reader, "STALL_SECONDS", 1.0)
    connection = await asyncpg.connect(pipeline.database_url)
    other = await asyncpg.connect(pipeline.database_url)
    await init_connection(connection)
    topic = pipeline.topics.costs
    try:
        await other.execute("SELECT pg_advisory_lock(x'62696C6C72626C64'::bigint)")
        with pytest.raises(RebuildError, match="another rebuild"):
            await rebuild(pipeline.bootstrap, connection, topic)
        await other.execute("SELECT pg_advisory_unlock_all()")

        reading = other.transaction()
        await reading.start()
        await other.fetchval("SELECT count(*) FROM billing_transactions")  # holds ACCESS SHARE
        with pytest.raises(RebuildError, match="readers held"):
            await rebuild(pipeline.bootstrap, connection, topic, lock_timeout=0.5)
        await reading.rollback()

        await other.execute(
            "UPDATE consumer_offsets SET next_offset = next_offset + 5 WHERE partition ="
            " (SELECT max(partition) FROM consumer_offsets WHERE next_offset > 0)"
        )
        with pytest.raises(RebuildError, match="ends before the offsets the projector applied"):
            await rebuild(pipeline.bootstrap, connection, topic)
    finally:
        await connection.close()
        await other.close()
    assert await read_models(pipeline.database_url) == live
    assert (await catalogue(pipeline.database_url))[2] == tables


async def test_the_summary_and_minute_keys_in_sql_are_the_projectors(
    database_url: str, snapshot_book: InMemoryPriceBook
) -> None:
    """``SUMMARY_KEY_SQL`` and ``MINUTE_KEY_SQL`` compute ``readmodels.summary_key`` and
    ``minute_key`` (UTC days and minutes, at their edges)."""
    base = recorded(0, random.Random(0))
    connection = await asyncpg.connect(database_url)
    try:
        for hours in (-11, 0, 5, 14):
            for at in (
                datetime(2026, 11, 1, 23, 59, 59, 999999, tzinfo=UTC),
                datetime(2026, 11, 2, 0, 0, tzinfo=UTC),
                datetime(2026, 12, 31, 23, 30, tzinfo=UTC),
            ):
                local = at.astimezone(timezone(timedelta(hours=hours)))
                fact = base.model_copy(update={"occurred_at": local, "api_key_id": None})
                row = transaction_row(rate(fact, snapshot_book, priced_at=T0))
                computed = await connection.fetchrow(
                    f"SELECT {', '.join(SUMMARY_KEY_SQL.values())} FROM (SELECT"
                    " $1::text AS tenant_id, $2::timestamptz AS occurred_at, $3::text AS model,"
                    " $4::text AS api_key_id) t",
                    row[1],
                    row[6],
                    row[5],
                    row[2],
                )
                assert tuple(computed) == summary_key(row)
                minute = await connection.fetchrow(
                    f"SELECT {', '.join(MINUTE_KEY_SQL.values())} FROM (SELECT"
                    " $1::text AS tenant_id, $2::timestamptz AS occurred_at) t",
                    row[1],
                    row[6],
                )
                assert tuple(minute) == minute_key(row)
    finally:
        await connection.close()


async def test_rebuild_keeps_partitions_and_retired_months_frozen(
    pipeline: Pipeline, snapshot_book: InMemoryPriceBook
) -> None:
    """Requests over four months; the oldest retired (its partition detached) while the
    projector runs, then a late event for it: the rebuild folds none of that month's events,
    keeps its summary rows, equals the live models and leaves the partitions as they were."""
    book = scaled(snapshot_book, Decimal(1), T0 - timedelta(days=800))
    months = [T0 - timedelta(days=95), T0 - timedelta(days=40), T0, T0 + timedelta(days=35)]
    facts = [
        recorded(n, random.Random(n)).model_copy(
            update={"occurred_at": months[n % 4], "recorded_at": months[n % 4]}
        )
        for n in range(40)
    ]
    events = [rate(f, book, priced_at=T0) for f in facts]
    await produce(pipeline.bootstrap, pipeline.topics.costs, encoded(events))
    pipeline.start("projector")
    await wait_committed(pipeline, len(events))
    connection = await asyncpg.connect(pipeline.database_url)
    try:
        oldest = month_of(months[0])
        retired = await retire(connection, add_months(oldest, 1))
        assert [r.month for r in retired] == [oldest] and retired[0].transactions == 10
    finally:
        await connection.close()
    late = rate(facts[0].model_copy(update={"request_id": "late-0"}), book, priced_at=T0)
    await produce(pipeline.bootstrap, pipeline.topics.costs, encoded([late]))
    await wait_committed(pipeline, len(events) + 1)
    live = await read_models(pipeline.database_url)
    assert len(live[0]) == 30
    assert "late-0" not in {k[0] for k in live[0]}
    before = await catalogue(pipeline.database_url)

    status, report, out = await run_rebuild(pipeline, "--dry-run")
    assert status == 0, out
    assert report["equal"] and report["retired_events"] == 11
    status, report, out = await run_rebuild(pipeline)
    assert status == 0, out
    assert report["swapped"] and report["equal"] and report["transactions"] == 30
    assert await read_models(pipeline.database_url) == live
    assert await catalogue(pipeline.database_url) == before
