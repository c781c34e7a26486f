"""Topic fuzzing (issue #14): mutated and random messages on every topic a service reads.

The pricer reads ``billing.usage.v1``; the projector and the quota service read
``billing.costs.v1`` (nothing else consumes a topic: alerts, invoices, unpriced usage and
dead letters are only written). Hypothesis draws 200 mutations per topic from valid events
(wrong types, 1 MB strings, unknown ``schema_version``, missing fields, non-JSON, non-UTF-8,
empty values, tombstones, keys of any shape, 300-digit integers, NaN and Infinity, negative
numbers, lone surrogates, NUL), interleaved with valid events. Every service runs in this
process on the real broker and database. Afterwards:

- every bad message is on the dead-letter topic once per service that read it, with a
  reason that never repeats the message's content;
- no service crashed or stalled: each valid event was applied;
- the totals (transactions, summary, quota charges and spend) are what the valid events
  alone give.

Derandomized (the same messages every run); ``BILLING_FUZZ_SEED=N`` draws others.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import os
import random
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from hypothesis import Phase, given, seed, settings
from hypothesis import strategies as st

from services.adapters.kafka import ensure_topics
from services.adapters.pricing_cache import PricingCache
from services.adapters.topics import Topics
from services.core.cost import COMPONENTS
from services.core.events import UsagePriced, UsageRecorded
from services.core.pricebook import InMemoryPriceBook
from services.core.rating import rate
from services.pricer.loop import BatchPricer
from services.projector.service import Projector
from services.quota.service import QuotaService
from tests.integration.pipeline import produce, read_records, until
from tests.integration.test_projector_apply import T0, recorded

pytestmark = pytest.mark.integration

BAD_PER_TOPIC = 200
GOOD_PER_TOPIC = 120
HUGE = 1_000_000  # bytes of one string: with the envelope, still below the 1 MiB request limit
HUGE_PER_TOPIC = 3
SECRET = "sk-or-v1-" + "5ec7e7" * 8  # planted in bad messages: no reason may repeat it

KINDS = (
    "non_json",
    "non_utf8",
    "empty",
    "tombstone",
    "wrong_type",
    "huge_string",
    "schema_version",
    "missing",
    "huge_int",
    "nan",
    "negative",
    "surrogate",
    "nul",
)
KEYS: tuple[bytes | None, ...] = (b"tenant", None, b"", b"\xff\xfe\x00", b"k" * 10_000)

# Fields by what a wrong value looks like for them (top level, or "parent.child").
STRINGS = ("request_id", "tenant_id", "provider", "provider_model_id", "metadata.app")
COUNTS = ("usage.prompt_tokens", "usage.completion_tokens", "usage.requests")
TIMESTAMPS = ("occurred_at", "recorded_at")
PRICED_STRINGS = (*STRINGS, "model", "reason")
PRICED_MONEY = ("total_cost", "breakdown.total_cost", "breakdown.prompt_cost", "delta_cost")
PRICED_INTS = ("price_version", "revision")
REQUIRED_RECORDED = (
    "request_id",
    "tenant_id",
    "provider",
    "provider_model_id",
    "occurred_at",
    "recorded_at",
    "usage",
)
REQUIRED_PRICED = (
    *REQUIRED_RECORDED,
    "model",
    "usage_source",
    "breakdown",
    "total_cost",
    "price_version",
    "revision",
    "priced_at",
    "previous_total_cost",
    "delta_cost",
    "breakdown.total_cost",
)

Spec = tuple[str, int, int, bytes]
"""(kind, a choice among the kind's variants, a key index, random bytes)."""


@functools.cache
def draw_specs(count: int, salt: int) -> list[Spec]:
    """``count`` mutation specs from Hypothesis, the same every run unless a seed is given."""
    drawn: list[Spec] = []
    specs = st.tuples(
        st.sampled_from(KINDS),
        st.integers(0, 10**6),
        st.integers(0, len(KEYS) - 1),
        st.binary(max_size=48),
    )
    configured = os.environ.get("BILLING_FUZZ_SEED")

    # Hypothesis starts from the simplest example (200 times the first kind): of a few
    # examples, the one with the most kinds and keys is kept.
    @settings(
        max_examples=8,
        database=None,
        derandomize=configured is None,
        phases=[Phase.generate],
        deadline=None,
    )
    @given(st.lists(specs, min_size=count, max_size=count))
    def collect(values: list[Spec]) -> None:
        def variety(specs: list[Spec]) -> int:
            return len({s[0] for s in specs}) * 10 + len({s[2] for s in specs})

        if not drawn or variety(values) >= variety(drawn):
            drawn[:] = values

    if configured is not None:
        collect = seed(int(configured) + salt)(collect)
    collect()
    assert len(drawn) == count
    assert len({s[0] for s in drawn}) == len(KINDS), "every kind of mutation is drawn"
    return drawn


def _set(document: dict[str, Any], path: str, value: Any) -> None:
    parent, _, name = path.rpartition(".")
    target = document[parent] if parent else document
    if target is None:  # e.g. reported: null
        return
    target[name] = value


def _delete(document: dict[str, Any], path: str) -> None:
    parent, _, name = path.rpartition(".")
    (document[parent] if parent else document).pop(name, None)


def _with_raw(document: dict[str, Any], path: str, raw: bytes) -> bytes:
    """The document with the JSON text of the field at ``path`` replaced by ``raw``."""
    _set(document, path, "@@RAW@@")
    return json.dumps(document).encode().replace(b'"@@RAW@@"', raw)


def mutate(valid: dict[str, Any], spec: Spec, priced: bool, huge_left: list[int]) -> bytes | None:
    """A message that must not decode, from a valid event document and a spec."""
    kind, choice, _, noise = spec
    doc = copy.deepcopy(valid)
    doc.setdefault("metadata", {})["app"] = SECRET
    strings = PRICED_STRINGS if priced else (*STRINGS, "usage_format")

    def pick(options: tuple[Any, ...]) -> Any:
        return options[choice % len(options)]

    if kind == "non_json":
        return b"}" + noise
    if kind == "non_utf8":
        return _with_raw(doc, pick(strings), b'"ab\xff\xfe' + noise.replace(b'"', b"") + b'"')
    if kind == "empty":
        return b""
    if kind == "tombstone":
        return None
    if kind == "wrong_type":
        fields = (*strings, *COUNTS, "usage", "metadata") + (
            (*PRICED_MONEY, *PRICED_INTS, "breakdown", "usage_source") if priced else ()
        )
        value = pick(([], {"x": [1]}, 1.5, [None]))
        _set(doc, fields[(choice // 7) % len(fields)], value)
        return json.dumps(doc).encode()
    if kind == "huge_string":
        length = HUGE if huge_left[0] > 0 else 10_000
        huge_left[0] -= 1
        char = pick(("x", "é", "✓"))
        _set(doc, pick(strings), char * (length // len(char.encode())))
        return json.dumps(doc, ensure_ascii=False).encode()
    if kind == "schema_version":
        doc["schema_version"] = pick((0, 2, 999, -1, "1", None, 10**300, [1]))
        return json.dumps(doc).encode()
    if kind == "missing":
        _delete(doc, pick(REQUIRED_PRICED if priced else REQUIRED_RECORDED))
        return json.dumps(doc).encode()
    if kind == "huge_int":
        targets = (*COUNTS, *PRICED_INTS, "pricing_tier.min", "total_cost") if priced else COUNTS
        path = pick(targets)
        if path == "pricing_tier.min":
            doc["pricing_tier"] = {"min_prompt_tokens": 10**300}
        else:
            # Each out of its field's range (a count below 10^12, revision an int4, …).
            limit = {"revision": 2**31, "price_version": 2**63}.get(path, 10**12)
            _set(doc, path, pick((10**300, -(10**300), limit, 2**64)))
        return json.dumps(doc).encode()
    if kind == "nan":
        money = (*PRICED_MONEY, "previous_total_cost") if priced else ("reported.cost",)
        path = pick(money)
        if path == "reported.cost":
            doc["reported"] = {"cost": "0.1", "upstream_inference_cost": None, "is_byok": False}
        raw = pick((b"NaN", b"Infinity", b"-Infinity", b'"NaN"', b'"Infinity"', b'"1E+999999"'))
        return _with_raw(doc, path, raw)
    if kind == "negative":
        targets = (*COUNTS, "revision", "price_version", "total_cost") if priced else COUNTS
        path = pick(targets)
        _set(doc, path, "-0.5" if path == "total_cost" else pick((-1, -(2**40))))
        return json.dumps(doc).encode()
    if kind == "surrogate":
        raw = pick((b'"\\ud800"', b'"a\\udfffb"', b'"\xed\xa0\x80"', b'"\\ud83d"'))
        return _with_raw(doc, pick(strings), raw)
    if kind == "nul":
        path = pick(strings)
        if choice % 5 == 4:  # a metadata key
            doc["metadata"] = {"a\x00b": "v"}
            return json.dumps(doc).encode()
        _set(doc, path, "a\x00b")
        return json.dumps(doc).encode()
    raise AssertionError(kind)


Message = tuple[bytes | None, bytes | None]


def interleave(
    good: list[Message], specs: list[Spec], template: Callable[[int], dict[str, Any]], priced: bool
) -> tuple[list[Message], int]:
    """Good and bad messages shuffled together (deterministically); how many are bad."""
    huge_left = [HUGE_PER_TOPIC]
    bad: list[Message] = []
    for n, spec in enumerate(specs):
        value = mutate(template(n), spec, priced, huge_left)
        # A record needs a key or a value (the client refuses neither).
        bad.append((KEYS[spec[2]] if value is not None else b"tenant", value))
    messages = good + bad
    random.Random(14).shuffle(messages)
    return messages, len(bad)


def _json(event: UsageRecorded | UsagePriced) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(event.model_dump_json())
    return document


async def test_every_bad_message_is_dead_lettered_and_every_good_one_counted(
    kafka_bootstrap: str, topic_prefix: str, database_url: str, snapshot_book: InMemoryPriceBook
) -> None:
    topics = Topics.named(topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.partitions())
    rng = random.Random(14)
    usage = [recorded(n, rng) for n in range(GOOD_PER_TOPIC)]
    costs = [
        rate(
            recorded(n, rng).model_copy(update={"request_id": f"cost-{n}"}),
            snapshot_book,
            priced_at=T0,
        )
        for n in range(GOOD_PER_TOPIC)
    ]
    # A few valid events under keys of an unusual shape: the key is not the event.
    usage_good: list[Message] = [
        (KEYS[n % 4] if n % 10 == 0 else e.tenant_id.encode(), e.model_dump_json().encode())
        for n, e in enumerate(usage)
    ]
    costs_good: list[Message] = [
        (e.tenant_id.encode(), e.model_dump_json().encode()) for e in costs
    ]
    usage_template, costs_template = _json(usage[0]), _json(costs[0])

    def fresh(template: dict[str, Any]) -> Callable[[int], dict[str, Any]]:
        # Each bad message has its own request_id: one wrongly accepted would be counted.
        return lambda n: {**template, "request_id": f"fuzz-{n}"}

    usage_messages, usage_bad = interleave(
        usage_good, draw_specs(BAD_PER_TOPIC, 1), fresh(usage_template), priced=False
    )
    costs_messages, costs_bad = interleave(
        costs_good, draw_specs(BAD_PER_TOPIC, 2), fresh(costs_template), priced=True
    )
    await produce(kafka_bootstrap, topics.usage, usage_messages)  # type: ignore[arg-type]
    await produce(kafka_bootstrap, topics.costs, costs_messages)  # type: ignore[arg-type]

    stop = asyncio.Event()
    pricer = BatchPricer(
        kafka_bootstrap,
        topics=topics,
        group=f"{topic_prefix}pricer",
        prices=PricingCache(snapshot_book, None),
        unpriced=None,
    )
    projector = Projector(kafka_bootstrap, database_url, topics=topics, group=f"{topic_prefix}p")
    quota = QuotaService(kafka_bootstrap, database_url, topics=topics, group=f"{topic_prefix}q")
    await pricer.start()
    services = [
        asyncio.create_task(projector.run(stop), name="projector"),
        asyncio.create_task(quota.run(stop), name="quota"),
    ]
    assert pricer._running is not None
    watched = [pricer._running, *services]
    want_rows = 2 * GOOD_PER_TOPIC
    connection = await asyncpg.connect(database_url)
    try:

        async def all_applied() -> bool:
            for task in watched:
                if task.done():  # crashed (or stopped by itself): show why
                    task.result()
                    pytest.fail(f"{task.get_name()} stopped")
            rows = await connection.fetchval("SELECT count(*) FROM billing_transactions")
            charges = await connection.fetchval("SELECT count(*) FROM billing_credit_charges")
            return bool(rows >= want_rows and charges >= want_rows)

        await until(all_applied, timeout=60)
        dead = await read_records(
            kafka_bootstrap, topics.dlq, usage_bad + 2 * costs_bad, timeout=30
        )
        await asyncio.sleep(1)  # anything still in flight must not change the totals
        assert all(not task.done() for task in watched), "a service stopped"

        # Totals: what the valid events alone give.
        priced_usage = [rate(u, snapshot_book, priced_at=T0) for u in usage]
        every = priced_usage + costs
        expected: Counter[str] = Counter()
        for event in every:
            expected[event.tenant_id] += event.total_cost  # type: ignore[assignment]
        assert await connection.fetchval("SELECT count(*) FROM billing_transactions") == len(every)
        rows = dict(
            await connection.fetch(
                "SELECT tenant_id, sum(total_cost) FROM billing_transactions GROUP BY 1"
            )
        )
        summary = dict(
            await connection.fetch(
                "SELECT tenant_id, sum(total_cost) FROM tenant_billing_summary GROUP BY 1"
            )
        )
        assert rows == dict(expected)
        assert summary == rows
        charges = dict(
            await connection.fetch(
                "SELECT tenant_id, sum(amount) FROM billing_credit_charges GROUP BY 1"
            )
        )
        spend = dict(
            await connection.fetch(
                "SELECT tenant_id, sum(spent) FROM billing_quota_spend WHERE api_key_id = ''"
                " GROUP BY 1"
            )
        )
        deltas: Counter[str] = Counter()
        for event in every:
            deltas[event.tenant_id] += event.delta_cost  # type: ignore[assignment]
        assert charges == dict(deltas) == spend
        assert await connection.fetchval("SELECT count(*) FROM billing_credit_charges") == len(
            every
        )
    finally:
        stop.set()
        await pricer.stop()
        await asyncio.wait_for(asyncio.gather(*services, return_exceptions=True), 30)
        await connection.close()

    # Every bad message dead-lettered: once from the usage topic (the pricer), twice from
    # the costs topic (the projector and the quota service), each with a reason.
    by_source = Counter(dict(r.headers)["source-topic"].decode() for r in dead)
    assert by_source == {topics.usage: usage_bad, topics.costs: 2 * costs_bad}
    for record in dead:
        reason = dict(record.headers)["reason"].decode()
        assert reason, record
        assert len(reason) <= 1000
        assert SECRET not in reason and "5ec7e7" not in reason, reason
    assert sum(1 for r in dead if r.value is not None and len(r.value) >= HUGE) >= 1


def test_the_mutations_never_decode() -> None:
    """The oracle above relies on it: every mutation is invalid by construction."""
    from services.core.events import decode_priced, decode_recorded

    rng = random.Random(1)
    event = recorded(1, rng)
    book_free = _json(event)
    for spec in draw_specs(BAD_PER_TOPIC, 1):
        value = mutate(book_free, spec, False, [0])
        with pytest.raises(Exception):  # noqa: B017, PT011 - any failure is a rejection
            decode_recorded(value)  # type: ignore[arg-type]
    priced = {
        **book_free,
        "model": "m",
        "usage_source": "upstream",
        "reported": None,
        "breakdown": dict.fromkeys(
            (*COMPONENTS, "total_cost"),
            "0",
        ),
        "total_cost": "0",
        "currency": "USD",
        "price_version": 1,
        "pricing_tier": None,
        "revision": 1,
        "priced_at": book_free["recorded_at"],
        "previous_total_cost": "0",
        "delta_cost": "0",
        "reason": "priced",
        "event_type": "UsagePriced",
    }
    priced.pop("usage_format", None)
    assert decode_priced(json.dumps(priced).encode())
    for spec in draw_specs(BAD_PER_TOPIC, 2):
        value = mutate(priced, spec, True, [0])
        with pytest.raises(Exception):  # noqa: B017, PT011
            decode_priced(value)  # type: ignore[arg-type]
    assert Decimal(0) == 0
