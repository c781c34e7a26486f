"""Price corrections re-rate history, on the real stack (pricer and projector processes).

Two tenants, three models; one model's price is corrected from a past time; ``billing
reprice`` is run as the CLI, dry and for real, and everything is checked against a
recomputation done here: the diff, the transactions, the summary (a fresh fold of the
transactions), the adjustments and the cost topic. The same re-rate again changes nothing,
and a second correction applied while the projector is SIGKILLed still ends exact. With the
quota service running, a correction that lowers past costs refunds prepaid balances by
exactly the re-rating deltas.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from services.core.corrections import record_correction
from services.core.events import UsageCounts, UsageRecorded, decode_priced
from services.core.pricebook import InMemoryPriceBook
from services.core.rating import rate
from services.core.usage import parse_usage
from tests.integration.pipeline import BILLING, Pipeline, produce, wait_for_count
from tests.integration.test_ingest import read_all
from tests.integration.test_projector_apply import T0

pytestmark = pytest.mark.integration
MODELS = ["openai/gpt-5", "anthropic/claude-haiku-4.5", "google/gemini-2.5-flash"]
SINCE, UNTIL = T0 - timedelta(days=1), T0 + timedelta(days=3)


def facts(count: int) -> list[UsageRecorded]:
    rng = random.Random(5)
    out = []
    for n in range(count):
        prompt, completion = rng.randint(100, 20_000), rng.randint(1, 2_000)
        usage = parse_usage(
            {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "prompt_tokens_details": {"cached_tokens": rng.randint(0, prompt // 2)},
            }
        ).usage
        out.append(
            UsageRecorded(
                request_id=f"rp-{n}",
                tenant_id=f"tenant-{n % 2}",
                api_key_id=f"key-{n % 3}",
                provider="openrouter",
                provider_model_id=MODELS[n % 3],
                occurred_at=T0 + timedelta(hours=n % 48),
                recorded_at=T0 + timedelta(hours=n % 48, seconds=2),
                usage=UsageCounts.of(usage),
            )
        )
    return out


@pytest.fixture
def services(pipeline: Pipeline) -> Pipeline:
    pipeline.start("pricer")
    pipeline.start("projector")
    return pipeline


async def ingest(pipeline: Pipeline, items: list[UsageRecorded]) -> None:
    values = [(i.tenant_id.encode(), i.model_dump_json().encode()) for i in items]
    await produce(pipeline.bootstrap, pipeline.topics.usage, values)
    await wait_for_count(pipeline, len(items))


def corrected(
    snapshot_book: InMemoryPriceBook, model: str, changes: dict[str, Decimal], since: datetime
) -> InMemoryPriceBook:
    """The snapshot prices plus one correction: what the services' book holds after it."""
    book = InMemoryPriceBook()
    for version in snapshot_book.all_versions():
        book._apply(version)
    record_correction(book, model, changes, effective_from=since, reason="x", by="test")
    return book


def billing(pipeline: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BILLING, *args], env=pipeline.env(), capture_output=True, text=True, timeout=300
    )


def expected_diff(
    items: list[UsageRecorded], old: InMemoryPriceBook, new: InMemoryPriceBook
) -> dict[tuple[str, str], tuple[int, Decimal, Decimal]]:
    diff: dict[tuple[str, str], tuple[int, Decimal, Decimal]] = {}
    for item in items:
        before, after = rate(item, old, priced_at=T0), rate(item, new, priced_at=T0)
        if before.total_cost != after.total_cost:
            n, o, t = diff.get((item.tenant_id, after.model), (0, Decimal(0), Decimal(0)))
            diff[(item.tenant_id, after.model)] = (
                n + 1,
                o + before.total_cost,
                t + after.total_cost,
            )
    return diff


async def state(database_url: str) -> tuple[dict[str, Decimal], int]:
    """(total per request, adjustments); fails when the summary is not a fold of the rows."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT request_id, total_cost FROM billing_transactions")
        mismatch = await connection.fetch(
            """
            WITH fold AS (
                SELECT tenant_id, (occurred_at AT TIME ZONE 'UTC')::date AS day, model,
                       coalesce(api_key_id, '') AS api_key_id, sum(total_cost) AS total,
                       sum(requests) AS requests, sum(prompt_tokens) AS prompt
                FROM billing_transactions GROUP BY 1, 2, 3, 4)
            SELECT * FROM fold FULL JOIN tenant_billing_summary s
              USING (tenant_id, day, model, api_key_id)
            WHERE fold.total IS DISTINCT FROM s.total_cost
               OR fold.requests IS DISTINCT FROM s.requests
               OR fold.prompt IS DISTINCT FROM s.prompt_tokens
            """
        )
        adjustments = await connection.fetchval("SELECT count(*) FROM billing_adjustments")
    finally:
        await connection.close()
    assert not mismatch, f"summary differs from a fold of the transactions: {mismatch[:3]}"
    return {r[0]: r[1] for r in rows}, int(adjustments)


async def test_a_correction_flows_to_transactions_summary_topic_and_audit_once(
    services: Pipeline, snapshot_book: InMemoryPriceBook, tmp_path: Path
) -> None:
    pipeline = services
    items = facts(240)
    await ingest(pipeline, items)

    corrected_from = T0 + timedelta(hours=20)
    fix = billing(
        pipeline,
        "prices",
        "set",
        "openai/gpt-5",
        "--prompt",
        "1.00",
        "--per-million",
        "--effective-from",
        corrected_from.isoformat(),
        "--reason",
        "catalogue price was wrong",
        "--by",
        "finance",
    )
    assert fix.returncode == 0, fix.stderr
    new_book = corrected(snapshot_book, "openai/gpt-5", {"prompt": Decimal("1E-6")}, corrected_from)
    expected = expected_diff(items, snapshot_book, new_book)
    assert expected and all(model == "openai/gpt-5" for _, model in expected)
    changed = sum(n for n, _, _ in expected.values())

    window = ["--since", SINCE.isoformat(), "--until", UNTIL.isoformat()]
    dry = billing(pipeline, "reprice", *window, "--dry-run", "--out", str(tmp_path / "d.json"))
    assert dry.returncode == 0, dry.stderr
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["emitted"] == 0 and report["changed"] == changed
    assert {
        (r["tenant_id"], r["model"]): (
            r["requests_changed"],
            Decimal(r["old_total"]),
            Decimal(r["new_total"]),
        )
        for r in report["diff"]
    } == expected
    for r in report["diff"]:
        assert Decimal(r["delta"]) == Decimal(r["new_total"]) - Decimal(r["old_total"])
    totals_before, adjustments = await state(pipeline.database_url)
    assert adjustments == 0  # the dry run changed nothing

    applied = billing(pipeline, "reprice", *window, "--reason", "gpt-5 fix")
    assert applied.returncode == 0, applied.stderr
    summary = json.loads(applied.stdout.splitlines()[-1])
    assert summary["emitted"] == changed and summary["applied"] == changed
    totals, adjustments = await state(pipeline.database_url)
    assert adjustments == changed
    assert totals == {i.request_id: rate(i, new_book, priced_at=T0).total_cost for i in items}
    assert sum(totals.values()) - sum(totals_before.values()) == sum(
        t - o for _, o, t in expected.values()
    )
    revisions = [
        decode_priced(v)
        for v in await read_all(pipeline.bootstrap, pipeline.topics.costs, len(items) + changed)
    ]
    second = [e for e in revisions if e.revision == 2]
    assert len(second) == changed
    assert all(e.delta_cost == e.total_cost - e.previous_total_cost for e in second)
    assert all(e.reason.startswith("gpt-5 fix [reprice ") for e in second)

    again = billing(pipeline, "reprice", *window, "--reason", "gpt-5 fix")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["emitted"] == 0
    assert (await state(pipeline.database_url))[1] == changed


async def test_a_run_waits_for_the_last_one_and_a_killed_projector_still_ends_exact(
    services: Pipeline, snapshot_book: InMemoryPriceBook
) -> None:
    pipeline = services
    items = facts(600)
    await ingest(pipeline, items)
    pipeline.kill("projector")  # the revisions will wait on the topic
    fix = billing(
        pipeline,
        "prices",
        "set",
        "anthropic/claude-haiku-4.5",
        "--completion",
        "0.000004",
        "--effective-from",
        SINCE.isoformat(),
        "--reason",
        "negotiated discount",
    )
    assert fix.returncode == 0, fix.stderr
    window = ["--since", SINCE.isoformat(), "--until", UNTIL.isoformat()]
    emitted = billing(pipeline, "reprice", *window, "--wait", "0")
    assert emitted.returncode == 0, emitted.stderr
    changed = json.loads(emitted.stdout.splitlines()[-1])["emitted"]
    assert changed == 200  # every haiku request (one in three)

    # A second run now would reuse the same revision numbers: it refuses.
    refused = billing(pipeline, "reprice", *window)
    assert refused.returncode == 1 and "not applied yet" in refused.stderr

    pipeline.start("projector")
    await asyncio.sleep(0.3)
    pipeline.kill("projector")  # SIGKILL as the revisions arrive (it may be mid-batch)
    pipeline.start("projector")
    new_book = corrected(
        snapshot_book, "anthropic/claude-haiku-4.5", {"completion": Decimal("4E-6")}, SINCE
    )
    want = {i.request_id: rate(i, new_book, priced_at=T0).total_cost for i in items}
    deadline = asyncio.get_running_loop().time() + 90
    while (await state(pipeline.database_url))[1] < changed:
        assert asyncio.get_running_loop().time() < deadline, pipeline.log("projector")
        await asyncio.sleep(0.5)
    totals, adjustments = await state(pipeline.database_url)
    assert adjustments == changed and totals == want
    again = billing(pipeline, "reprice", *window)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["emitted"] == 0


async def test_a_correction_that_lowers_past_costs_refunds_prepaid_balances_exactly(
    services: Pipeline, snapshot_book: InMemoryPriceBook
) -> None:
    """The quota service follows re-rating: each tenant's balance rises by exactly the
    deltas of its re-rated requests (issue #11)."""
    pipeline = services
    pipeline.start("quota")
    for tenant in ("tenant-0", "tenant-1"):
        assert billing(pipeline, "tenants", "create", tenant).returncode == 0
        added = billing(pipeline, "credits", "add", tenant, "1000", "--reason", "prepaid")
        assert added.returncode == 0, added.stderr
    items = facts(120)
    await ingest(pipeline, items)
    old = {i.request_id: rate(i, snapshot_book, priced_at=T0).total_cost for i in items}

    async def balances(revisions: int) -> dict[str, Decimal]:
        """tenant → balance, once the quota service has charged ``revisions`` rows."""
        connection = await asyncpg.connect(pipeline.database_url)
        try:
            for _ in range(600):
                if await connection.fetchval("SELECT count(*) FROM billing_credit_charges") >= (
                    revisions
                ):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(
                    f"the quota service did not charge {revisions}:\n{pipeline.log('quota')}"
                )
            shown = billing(pipeline, "balance", "tenant-0", "--json")
            assert shown.returncode == 0, shown.stderr
            rows = await connection.fetch(
                "SELECT t.tenant_id, (SELECT sum(amount) FROM billing_credit_grants g"
                " WHERE g.tenant_id = t.tenant_id) - coalesce((SELECT sum(amount)"
                " FROM billing_credit_charges c WHERE c.tenant_id = t.tenant_id), 0) AS balance"
                " FROM tenants t ORDER BY 1"
            )
        finally:
            await connection.close()
        assert Decimal(json.loads(shown.stdout)["balance"]) == rows[0]["balance"]
        return {r["tenant_id"]: r["balance"] for r in rows}

    before = await balances(len(items))
    for tenant in ("tenant-0", "tenant-1"):
        spent = sum(c for i, c in zip(items, old.values(), strict=True) if i.tenant_id == tenant)
        assert before[tenant] == Decimal(1000) - spent

    corrected_from = T0 + timedelta(hours=10)
    fix = billing(
        pipeline,
        "prices",
        "set",
        "openai/gpt-5",
        "--prompt",
        "0.50",
        "--per-million",
        "--effective-from",
        corrected_from.isoformat(),
        "--reason",
        "lower",
    )
    assert fix.returncode == 0, fix.stderr
    new_book = corrected(snapshot_book, "openai/gpt-5", {"prompt": Decimal("5E-7")}, corrected_from)
    new = {i.request_id: rate(i, new_book, priced_at=T0).total_cost for i in items}
    changed = [i for i in items if new[i.request_id] != old[i.request_id]]
    assert changed and all(new[i.request_id] < old[i.request_id] for i in changed)
    window = ["--since", SINCE.isoformat(), "--until", UNTIL.isoformat()]
    applied = billing(pipeline, "reprice", *window, "--reason", "gpt-5 lower")
    assert applied.returncode == 0, applied.stderr

    after = await balances(len(items) + len(changed))
    for tenant in ("tenant-0", "tenant-1"):
        refund = sum(
            old[i.request_id] - new[i.request_id] for i in changed if i.tenant_id == tenant
        )
        assert after[tenant] - before[tenant] == refund  # exactly the re-rating deltas
