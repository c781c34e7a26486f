"""``services.projector.plan``: the projector's batch fold, without a database.

Batches are built from a set of distinct events (several revisions per request, each
revision one fact however often it is delivered) against stored rows for some of the
requests. Amounts carry 8 integer digits and 30 decimal places (38 significant digits), so
any sum taken in Python's default 28-digit context would round and show up here.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.adapters.readmodels import (
    ADJUSTMENT_COLUMNS,
    COST_COLUMNS,
    SUMMARY_VALUE_SLICE,
    SUMMARY_VALUES,
    TRANSACTION_COLUMNS,
    SummaryKey,
    summary_key,
    transaction_row,
)
from services.core.cost import COMPONENTS
from services.core.events import Breakdown, ReportedCharge, UsageCounts, UsagePriced
from services.core.money import difference, total
from services.projector.plan import Plan, plan

T0 = datetime(2026, 11, 1, 23, 30, tzinfo=UTC)
WHEN = [  # both sides of a UTC midnight, one of them written in another offset
    T0,
    (T0 + timedelta(hours=1)).astimezone(timezone(timedelta(hours=5))),
    T0 - timedelta(days=3),
]
REQUESTS = [f"req-{n}" for n in range(5)]
REVISION = TRANSACTION_COLUMNS.index("revision")
TOTAL = TRANSACTION_COLUMNS.index("total_cost")

amounts = st.builds(
    lambda whole, part: Decimal(f"{whole}.{part:030d}"),
    st.integers(0, 10**8 - 1),
    st.integers(0, 10**30 - 1),
)


def priced(
    request_id: str,
    revision: int,
    *,
    costs: Sequence[Decimal],
    tokens: tuple[int, int] = (1000, 200),
    tenant: str = "tenant-a",
    model: str = "openai/gpt-5",
    api_key: str | None = "key-1",
    occurred_at: datetime = T0,
    reported: Decimal | None = None,
) -> UsagePriced:
    """A ``UsagePriced`` whose breakdown is ``costs`` (one per component) and their sum."""
    prompt, completion = tokens
    breakdown = dict(zip(COMPONENTS, costs, strict=True))
    cost = total(costs)
    return UsagePriced(
        request_id=request_id,
        tenant_id=tenant,
        api_key_id=api_key,
        provider="openrouter",
        provider_model_id=model,
        model=model,
        occurred_at=occurred_at,
        recorded_at=T0,
        usage=UsageCounts(
            prompt_tokens=prompt, uncached_input_tokens=prompt, completion_tokens=completion
        ),
        usage_source="upstream",
        reported=None if reported is None else ReportedCharge(cost=reported),
        breakdown=Breakdown(**breakdown, total_cost=cost),
        total_cost=cost,
        price_version=revision,
        revision=revision,
        priced_at=T0,
        previous_total_cost=0,
        delta_cost=cost,
        reason="priced" if revision == 1 else "corrected",
    )


@st.composite
def facts(draw: st.DrawFn, request_id: str, revision: int) -> UsagePriced:
    return priced(
        request_id,
        revision,
        costs=draw(st.lists(amounts, min_size=len(COMPONENTS), max_size=len(COMPONENTS))),
        tokens=(draw(st.integers(0, 10**11)), draw(st.integers(0, 10**11))),
        tenant=draw(st.sampled_from(["tenant-a", "tenant-b"])),
        model=draw(st.sampled_from(["openai/gpt-5", "google/gemini-2.5-flash"])),
        api_key=draw(st.sampled_from([None, "key-1"])),
        occurred_at=draw(st.sampled_from(WHEN)),
        reported=draw(st.none() | amounts),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, tuple[Any, ...]], list[UsagePriced]]:
    """(stored rows of some requests, the distinct events of a batch)."""
    existing: dict[str, tuple[Any, ...]] = {}
    events: list[UsagePriced] = []
    for request_id in draw(st.lists(st.sampled_from(REQUESTS), min_size=1, unique=True)):
        if draw(st.booleans()):
            stored = draw(facts(request_id, draw(st.integers(1, 4))))
            existing[request_id] = transaction_row(stored)
        revisions = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3, unique=True))
        events += [draw(facts(request_id, revision)) for revision in revisions]
    return existing, events


def deliveries(events: Sequence[UsagePriced], rng: random.Random) -> list[UsagePriced]:
    """``events`` each delivered one to three times, in any order."""
    delivered = [e for e in events for _ in range(rng.randint(1, 3))]
    rng.shuffle(delivered)
    return delivered


def normalised(result: Plan) -> tuple[Any, ...]:
    """What a plan does, independent of the order it lists it in."""
    return (
        {row[0]: row for row in result.rows},
        result.deltas,
        sorted(result.adjustments),
        result.inserted,
        result.revised,
        sorted(result.drifts),
    )


def sums(rows: Iterable[Sequence[Any]]) -> dict[SummaryKey, list[Decimal]]:
    """The exact ``SUMMARY_VALUES`` sums per key, computed the slow, obvious way."""
    grouped: dict[SummaryKey, list[Sequence[Any]]] = {}
    for row in rows:
        grouped.setdefault(summary_key(row), []).append(row)
    return {
        key: [total(r[TRANSACTION_COLUMNS.index(c)] for r in group) for c in SUMMARY_VALUES]
        for key, group in grouped.items()
    }


def final_state(
    existing: Mapping[str, tuple[Any, ...]], events: Iterable[UsagePriced]
) -> dict[str, tuple[Any, ...]]:
    """Per request, the stored row or the batch's highest revision, whichever is newer."""
    state = dict(existing)
    for event in events:
        held = state.get(event.request_id)
        if held is None or held[REVISION] < event.revision:
            state[event.request_id] = transaction_row(event)
    return state


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False), st.randoms(use_true_random=False))
def test_any_order_and_duplication_of_a_batch_plans_the_same(
    scenario: tuple[dict[str, tuple[Any, ...]], list[UsagePriced]],
    first: random.Random,
    second: random.Random,
) -> None:
    existing, events = scenario
    one, other = deliveries(events, first), deliveries(events, second)
    assert normalised(plan(existing, one)) == normalised(plan(existing, other))
    assert (
        plan(existing, one).duplicates == len(one) - len(events) + plan(existing, events).duplicates
    )


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False))
def test_the_plan_moves_the_read_models_to_the_fold_of_the_log(
    scenario: tuple[dict[str, tuple[Any, ...]], list[UsagePriced]], rng: random.Random
) -> None:
    existing, events = scenario
    batch = deliveries(events, rng)
    result = plan(existing, batch)

    after = final_state(existing, events)
    changed = {rid: row for rid, row in after.items() if existing.get(rid) is not row}
    assert {row[0]: row for row in result.rows} == changed
    revised = sorted(rid for rid in changed if rid in existing)
    assert (result.inserted, result.revised) == (len(changed) - len(revised), len(revised))
    assert result.duplicates == len(batch) - len(changed)
    assert sorted(result.adjustments) == sorted(
        (
            rid,
            after[rid][1],
            existing[rid][REVISION],
            after[rid][REVISION],
            existing[rid][TOTAL],
            after[rid][TOTAL],
            difference(after[rid][TOTAL], existing[rid][TOTAL]),
            after[rid][REVISION],  # price_version == revision in these events
            "priced" if after[rid][REVISION] == 1 else "corrected",
        )
        for rid in revised
    )
    reported = TRANSACTION_COLUMNS.index("reported_cost")
    assert sorted(result.drifts) == sorted(
        difference(row[TOTAL], row[reported]).copy_abs()
        for rid, row in changed.items()
        if rid not in existing and row[reported] is not None
    )
    # Summary after = summary before + deltas, exactly: each key's delta is the exact sum of
    # its rows after the batch minus the exact sum before it.
    before, later = sums(existing.values()), sums(after.values())
    zeros = [Decimal(0)] * len(SUMMARY_VALUES)
    for key in {*before, *later, *result.deltas}:
        expected = [
            difference(new, old)
            for new, old in zip(later.get(key, zeros), before.get(key, zeros), strict=True)
        ]
        assert list(result.deltas.get(key, zeros)) == expected, key


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False), st.data())
def test_a_batch_already_applied_and_stale_revisions_change_nothing(
    scenario: tuple[dict[str, tuple[Any, ...]], list[UsagePriced]],
    rng: random.Random,
    data: st.DataObject,
) -> None:
    existing, events = scenario
    after = final_state(existing, events)
    # Other facts at or below each stored revision (a late delivery of an older pricing, or
    # a pricer that re-priced at the same revision): the stored row wins over all of them.
    stale = [
        data.draw(facts(rid, data.draw(st.integers(1, row[REVISION]))))
        for rid, row in after.items()
    ]
    again = deliveries([*events, *stale], rng)
    nothing = plan(after, again)
    assert normalised(nothing) == ({}, {}, [], 0, 0, [])
    assert nothing.duplicates == len(again)


def test_a_summary_delta_is_the_exact_sum_where_the_default_context_rounds() -> None:
    big = [Decimal("99999999.000000000000000000000000000001")] * len(COMPONENTS)
    events = [priced(f"req-{n}", 1, costs=big) for n in range(3)]
    result = plan({}, events)
    (key,) = result.deltas
    delta_total = result.deltas[key][SUMMARY_VALUES.index("total_cost")]
    assert delta_total == Decimal("2399999976.000000000000000000000000000024")
    assert delta_total == total(e.total_cost for e in events)
    assert sum(e.total_cost for e in events) != delta_total  # what a rounding fold would give


def test_a_revision_moving_a_request_to_another_key_subtracts_from_the_old_one() -> None:
    costs = [Decimal("1.000000000000000000000000000001")] * len(COMPONENTS)
    old = transaction_row(priced("req-1", 1, costs=costs, tokens=(10, 5), model="openai/gpt-5"))
    moved = priced(
        "req-1",
        2,
        costs=[Decimal(2)] * len(COMPONENTS),
        tokens=(30, 7),
        model="google/gemini-2.5-flash",
        api_key=None,
        occurred_at=T0 + timedelta(hours=1),  # the next UTC day too
    )
    result = plan({"req-1": old}, [moved])
    new_key = ("tenant-a", T0.date() + timedelta(days=1), "google/gemini-2.5-flash", "")
    old_key = ("tenant-a", T0.date(), "openai/gpt-5", "key-1")
    assert set(result.deltas) == {old_key, new_key}
    assert result.deltas[old_key] == tuple(difference(0, v) for v in old[SUMMARY_VALUE_SLICE])
    assert result.deltas[new_key] == transaction_row(moved)[SUMMARY_VALUE_SLICE]
    old_total = Decimal("8.000000000000000000000000000008")
    assert result.deltas[old_key][SUMMARY_VALUES.index("total_cost")] == Decimal(
        "-8.000000000000000000000000000008"
    )
    assert result.deltas[old_key][SUMMARY_VALUES.index("prompt_tokens")] == -10
    ((*_, stored_total, new_total, delta, _, reason),) = result.adjustments
    assert (stored_total, new_total) == (old_total, Decimal(16))
    assert delta == Decimal("7.999999999999999999999999999992")
    assert reason == "corrected"
    assert (result.inserted, result.revised, result.duplicates) == (0, 1, 0)


def test_among_equal_revisions_in_a_batch_the_first_delivered_wins() -> None:
    """As the rebuild keeps it (first in log order): a pricer that re-priced a request at
    the same revision after a crash does not bill it twice or at the later figure."""
    first = priced("req-1", 1, costs=[Decimal(1)] * len(COMPONENTS))
    repriced = priced("req-1", 1, costs=[Decimal(3)] * len(COMPONENTS))
    for batch in ([first, repriced, first], [repriced, first]):
        result = plan({}, batch)
        assert [row[TOTAL] for row in result.rows] == [batch[0].total_cost]
        assert (result.inserted, result.duplicates) == (1, len(batch) - 1)


def test_the_read_model_shape_is_consistent() -> None:
    assert TRANSACTION_COLUMNS[SUMMARY_VALUE_SLICE] == SUMMARY_VALUES
    assert SUMMARY_VALUES[-len(COST_COLUMNS) :] == COST_COLUMNS
    assert len(ADJUSTMENT_COLUMNS) == 9
