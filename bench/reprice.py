"""Re-rating throughput (issue #5): ``reprice`` over N stored transactions, beside a plain scan.

One run creates a fresh PostgreSQL database (``bench_reprice_<hex>`` on
``BILLING_DATABASE_URL``'s server, else postgresql://postgres@127.0.0.1:5432; an embedded
pgserver when neither answers), migrates it, seeds a ``PostgresPriceBook`` with the bundled
snapshot and COPYs N generated transactions into ``billing_transactions``: 12 tenants with a
skewed share each, the 12 bundled models (Claude Sonnet 4.5 half the traffic), cached,
cache-write, reasoning, web-search and long-context (> 200k) usage, reported costs,
``occurred_at`` spread over 30 days. Every row is ``_row(rate(fact))`` — exactly what the
projector writes for the first revision — and the summary table is filled to match.
Generation and loading are timed apart; they are not part of any figure.

Then one correction is recorded (Sonnet 4.5's prompt and completion prices −10% from day 10
of the window), so about a third of the rows change, and it measures, over the whole window:

1. reference: the re-rate's columns, ``SELECT … WHERE occurred_at in window`` through an
   asyncpg cursor (same prefetch, same codecs, same read-only repeatable-read transaction),
   rows/s; once before and once after the project's runs, the better one is the reference.
   The same scan with the re-rate's ``ORDER BY occurred_at, request_id`` is shown too;
2. ``reprice(dry_run=True)``: rows scanned per second, end to end (connect to report);
3. ``reprice(dry_run=False)`` to an embedded Tansu broker, no projector, no wait: rows
   scanned/s and revisions emitted/s; the emitted revisions are read back (count, decode,
   revision 2, delta) and re-sent by a raw aiokafka loop (same producer settings, same
   send-then-gather per batch) as the reference for the emission rate;
4. with ``--with-projector``: ``billing projector`` (a subprocess) applying the emitted
   revisions; adjustments/s from the first to the last, then summary = Σ transactions;
5. with ``--profile``: cProfile of one dry run and one applied run (after the timed runs,
   before the projector, on topics of their own), top functions by own time and the
   project's functions by cumulative time.

The machine is shared and noisy: read the ratios. CPU is given in cores (this process,
the broker, every ``postgres`` process).

    .venv/bin/python bench/reprice.py --quick --profile      # N = 50,000 (< 1 min)
    .venv/bin/python bench/reprice.py --with-projector       # N = 1,000,000 (~8 min)
    .venv/bin/python bench/reprice.py --events 200000 --batch 10000
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import platform
import pstats
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.adapters.database import init_connection, migrate
from services.adapters.kafka import ensure_topics, make_producer
from services.adapters.pricebook_postgres import PostgresPriceBook
from services.adapters.readmodels import (
    COST_COLUMNS,
    COUNT_COLUMNS,
    SUMMARY_KEY,
    SUMMARY_VALUES,
    TRANSACTION_COLUMNS,
)
from services.adapters.readmodels import transaction_row as _row
from services.adapters.topics import Topics
from services.core.catalogue import apply_catalogue, default_catalogue
from services.core.corrections import record_correction
from services.core.events import ReportedCharge, UsageCounts, UsageRecorded, decode_priced
from services.core.pricebook import PriceLookup
from services.core.rating import rate
from services.core.rerating import Report, Window
from services.core.usage import Usage, check_usage
from services.jobs.reprice import Broker, reprice
from services.jobs.reprice_sources import FACT_COLUMNS, where_of
from services.local.broker import EmbeddedBroker
from services.local.postgres import EmbeddedPostgres

BILLING = shutil.which("billing", path=os.path.dirname(sys.executable)) or "billing"
DEFAULT_DB = "postgresql://postgres@127.0.0.1:5432/postgres"
GOAL = 10_000  # events/s: a million in under two minutes
SINCE, DAYS, CORRECTED_FROM_DAY = datetime(2026, 10, 1, tzinfo=UTC), 30, 10
CORRECTED = "anthropic/claude-sonnet-4.5"
DISCOUNT = Decimal("0.9")
REASON = "bench: negotiated Sonnet 4.5 discount"
CHUNK = 20_000  # rows generated and COPYed at a time
TENANTS = [f"tenant-{n:02d}" for n in range(12)]
TENANT_WEIGHTS = [1 / (n + 1) for n in range(len(TENANTS))]  # a few big customers
APPS = ["chat", "agent", "batch-summaries", "support-bot", "code-review"]


def model_mix() -> tuple[list[str], list[float]]:
    """The bundled models; the corrected one carries half the traffic, the rest share it."""
    models = [entry.model for entry in default_catalogue().entries]
    others = [m for m in models if m != CORRECTED]
    return [CORRECTED, *others], [0.5, *([0.5 / len(others)] * len(others))]


# -- the data ---------------------------------------------------------------------------------


def make_fact(rng: random.Random, n: int, models: list[str], weights: list[float]) -> UsageRecorded:
    """One realistic usage fact, valid by construction (checked, then built unvalidated)."""
    model = rng.choices(models, weights)[0]
    tenant = rng.choices(TENANTS, TENANT_WEIGHTS)[0]
    occurred = SINCE + timedelta(seconds=rng.random() * DAYS * 86_400)
    long_context = rng.random() < 0.02
    prompt = rng.randint(200_001, 600_000) if long_context else rng.randint(50, 40_000)
    cached = rng.randint(0, prompt // 2) if rng.random() < 0.5 else 0
    anthropic = model.startswith("anthropic/")
    written = rng.randint(0, (prompt - cached) // 2) if anthropic and rng.random() < 0.3 else 0
    written_1h = rng.randint(0, written) if written and rng.random() < 0.2 else 0
    completion = rng.randint(1, 4_000)
    usage = Usage(
        prompt_tokens=prompt,
        uncached_input_tokens=prompt - cached - written,
        cache_read_tokens=cached,
        cache_write_tokens=written - written_1h,
        cache_write_1h_tokens=written_1h,
        completion_tokens=completion,
        reasoning_tokens=rng.randint(0, completion) if rng.random() < 0.4 else 0,
        web_search_requests=1 if rng.random() < 0.03 else 0,
    )
    check_usage(usage)
    via_openrouter = rng.random() < 0.8
    reported = None
    if via_openrouter:
        cost = Decimal(rng.randint(1_000, 5_000_000)).scaleb(-9)
        reported = ReportedCharge.model_construct(
            cost=cost, upstream_inference_cost=None, is_byok=False
        )
    return UsageRecorded.model_construct(
        event_type="UsageRecorded",
        schema_version=1,
        request_id=f"req-{n:08d}-{rng.getrandbits(32):08x}",
        tenant_id=tenant,
        api_key_id=f"{tenant}-key-{rng.randint(1, 3)}",
        provider="openrouter" if via_openrouter else model.split("/", 1)[0],
        provider_model_id=model,
        occurred_at=occurred,
        recorded_at=occurred + timedelta(milliseconds=rng.randint(5, 2_000)),
        usage=UsageCounts.of(usage),
        usage_source="estimated" if rng.random() < 0.01 else "upstream",
        usage_format="openai" if via_openrouter else "normalised",
        reported=reported,
        metadata={"app": rng.choice(APPS), "env": "prod"},
    )


def priced_rows(book: PriceLookup, start: int, count: int, seed: int) -> Iterator[tuple[Any, ...]]:
    """Rows ``start … start+count`` as the projector writes a first revision of each."""
    rng = random.Random(seed * 1_000_003 + start)
    models, weights = model_mix()
    for n in range(start, start + count):
        fact = make_fact(rng, n, models, weights)
        yield _row(rate(fact, book, priced_at=fact.recorded_at + timedelta(milliseconds=300)))


async def load(url: str, book: PriceLookup, n: int, seed: int) -> tuple[float, float]:
    """COPY N priced rows (chunks of CHUNK); the summary to match; (generate s, load s)."""
    connection = await asyncpg.connect(url)
    await init_connection(connection)
    generating = loading = 0.0
    try:
        for start in range(0, n, CHUNK):
            clock = time.perf_counter()
            rows = list(priced_rows(book, start, min(CHUNK, n - start), seed))
            generating += time.perf_counter() - clock
            clock = time.perf_counter()
            await connection.copy_records_to_table(
                "billing_transactions", records=rows, columns=TRANSACTION_COLUMNS
            )
            loading += time.perf_counter() - clock
            if sys.stdout.isatty():
                print(f"\r  generated and loaded {start + len(rows):,}/{n:,}", end="", flush=True)
        clock = time.perf_counter()
        sums = ", ".join(f"sum({c})" for c in (*COUNT_COLUMNS, *COST_COLUMNS))
        await connection.execute(
            f"INSERT INTO tenant_billing_summary ({', '.join((*SUMMARY_KEY, *SUMMARY_VALUES))})"  # noqa: S608
            f" SELECT tenant_id, (occurred_at AT TIME ZONE 'UTC')::date, model,"
            f" coalesce(api_key_id, ''), {sums} FROM billing_transactions GROUP BY 1, 2, 3, 4"
        )
        await connection.execute("VACUUM (ANALYZE) billing_transactions")  # hint bits, stats
        loading += time.perf_counter() - clock
    finally:
        await connection.close()
    if sys.stdout.isatty():
        print()
    return generating, loading


def correct(book: PostgresPriceBook) -> tuple[datetime, int]:
    """Record the correction; return when it takes effect and the tier threshold (tokens)."""
    effective = SINCE + timedelta(days=CORRECTED_FROM_DAY)
    base = book.lookup(CORRECTED, effective).pricing
    changes = {"prompt": base.prompt * DISCOUNT, "completion": base.completion * DISCOUNT}
    version, _ = record_correction(
        book, CORRECTED, changes, effective_from=effective, reason=REASON, by="bench"
    )
    if version is None:
        raise RuntimeError("the correction changed nothing")
    thresholds = [t.min_prompt_tokens for t in base.tiers if t.min_prompt_tokens is not None]
    return effective, min(thresholds, default=10**12)


# -- measurements -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process (Linux /proc); ``None`` when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


class Cpu:
    """CPU cores used during a phase by this process, the named processes and PostgreSQL.

    PostgreSQL's backends come and go with connections, so its processes are sampled every
    0.2 s: a backend first seen during the phase counts from 0, one that exits between two
    samples loses at most its last 0.2 s. Other clients of a shared server count too."""

    def __init__(self, **pids: int) -> None:
        self.pids = pids
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}

    def _sample(self, starting: bool = False) -> None:
        for pid in postgres_pids():
            used = cpu_seconds(pid)
            if used is not None:
                self.first.setdefault(pid, used if starting else 0.0)
                self.last[pid] = used

    async def _sampler(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self._sample()

    async def __aenter__(self) -> Cpu:
        self._sample(starting=True)
        self.used = {name: cpu_seconds(pid) or 0.0 for name, pid in self.pids.items()}
        self.own, self.started = time.process_time(), time.perf_counter()
        self.task = asyncio.create_task(self._sampler())
        return self

    async def __aexit__(self, *_: object) -> None:
        self.task.cancel()
        self._sample()
        elapsed = time.perf_counter() - self.started
        self.cores = {"bench": (time.process_time() - self.own) / elapsed}
        for name, pid in self.pids.items():
            self.cores[name] = ((cpu_seconds(pid) or 0.0) - self.used[name]) / elapsed
        pg = sum(self.last[pid] - first for pid, first in self.first.items())
        self.cores["postgres"] = pg / elapsed

    def __str__(self) -> str:
        return ", ".join(f"{name} {used:.2f}" for name, used in self.cores.items())


async def scan(url: str, window: Window, batch: int, ordered: bool) -> tuple[int, float]:
    """The reference: the re-rate's columns and window through a cursor; (rows, seconds)."""
    where, args = where_of(window)
    query = f"SELECT {FACT_COLUMNS} FROM billing_transactions WHERE {where}"  # noqa: S608
    if ordered:
        query += " ORDER BY occurred_at, request_id"
    started = time.perf_counter()
    connection = await asyncpg.connect(url)
    await init_connection(connection)
    rows = 0
    try:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            async for _ in connection.cursor(query, *args, prefetch=batch):
                rows += 1
    finally:
        await connection.close()
    return rows, time.perf_counter() - started


async def read_back(bootstrap: str, topic: str, expected: int) -> list[tuple[bytes, bytes]]:
    """Every (key, value) on ``topic``: until ``expected`` arrived or nothing came for 5 s."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100
    )
    await consumer.start()
    try:
        await consumer.topics()  # every topic's metadata (naming one would auto-create it)
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        records: list[tuple[bytes, bytes]] = []
        while len(records) < expected:
            fetched = await consumer.getmany(timeout_ms=5_000, max_records=10_000)
            if not fetched:
                break
            records += [(r.key, r.value) for batch in fetched.values() for r in batch]
        return records
    finally:
        await consumer.stop()


async def raw_send(
    bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], batch: int
) -> float:
    """The emission reference: ``_send``'s pattern with pre-encoded values; seconds."""
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        await producer.partitions_for(topic)
        started = time.perf_counter()
        for i in range(0, len(records), batch):
            pending = [await producer.send(topic, v, key=k) for k, v in records[i : i + batch]]
            await asyncio.gather(*pending)
        return time.perf_counter() - started
    finally:
        await producer.stop()


def check_revisions(records: list[tuple[bytes, bytes]], report: Report) -> str:
    """Every emitted revision decodes, is revision 2 of a distinct request, carries the run's
    reason and a delta equal to new - old; return a one-line verdict."""
    tag = f"[reprice {report.run_id}]"
    delta, ids = Decimal(0), set()
    for _key, value in records:
        event = decode_priced(value)
        if event.revision != 2 or not event.reason.endswith(tag):
            raise RuntimeError(f"unexpected revision {event.revision} / reason {event.reason!r}")
        if event.delta_cost != event.total_cost - event.previous_total_cost:
            raise RuntimeError(f"{event.request_id}: delta is not new - old")
        delta += event.delta_cost
        ids.add(event.request_id)
    if len(ids) != len(records) or len(records) != report.emitted:
        raise RuntimeError(f"read back {len(records)} ({len(ids)} distinct) of {report.emitted}")
    if delta != Decimal(report.to_json()["delta"]):
        raise RuntimeError(f"emitted deltas sum to {delta}, the report says {report.to_json()}")
    return f"all {len(records):,} decode, revision 2, distinct requests, Σ delta {delta:.6f} USD"


async def run_projector(
    bench: Run, prefix: str, report: Report, workdir: Path
) -> dict[str, float | str]:
    """``billing projector`` on ``prefix``: spawn → first adjustment, then adjustments/s."""
    env = {**os.environ, "BILLING_KAFKA_BOOTSTRAP": bench.bootstrap,
           "BILLING_DATABASE_URL": bench.url, "BILLING_TOPIC_PREFIX": prefix,
           "BILLING_DATA_DIR": str(workdir), "BILLING_CATALOGUE_SYNC": "false"}  # fmt: skip
    tagged = f"{REASON} [reprice {report.run_id}]"
    connection = await asyncpg.connect(bench.url)
    log = (workdir / "projector.log").open("ab")
    spawned = time.perf_counter()
    process = subprocess.Popen([BILLING, "projector"], env=env, stdout=log, stderr=log)
    try:
        first = last = None
        applied = 0
        async with Cpu(broker=bench.broker_pid, projector=process.pid) as cpu:
            while applied < report.emitted:
                if process.poll() is not None:
                    raise RuntimeError(f"the projector exited with {process.returncode}")
                if time.perf_counter() - spawned > 1_800:
                    raise RuntimeError(f"the projector applied {applied:,} in 30 min")
                applied = int(
                    await connection.fetchval(
                        "SELECT count(*) FROM billing_adjustments WHERE reason = $1", tagged
                    )
                )
                now = time.perf_counter()
                if applied and first is None:
                    first = now
                last = now
                await asyncio.sleep(0.2)
        assert first is not None and last is not None  # noqa: S101  # applied > 0 above
        sums = await connection.fetchrow(
            "SELECT (SELECT sum(total_cost) FROM billing_transactions) AS rows,"
            " (SELECT sum(total_cost) FROM tenant_billing_summary) AS summary,"
            " (SELECT count(*) FROM billing_transactions WHERE revision = 2) AS revised"
        )
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        await connection.close()
    if sums["rows"] != sums["summary"] or sums["revised"] != report.emitted:
        raise RuntimeError(f"after the projector: {dict(sums)}")
    return {"startup": first - spawned, "rate": report.emitted / max(last - first, 1e-9),
            "total": last - spawned, "cpu": str(cpu),
            "summary": f"Σ summary = Σ transactions = {sums['rows']:.6f} USD"}  # fmt: skip


# -- the run ----------------------------------------------------------------------------------


class Run:
    """The database, broker and price book of one run."""

    def __init__(self, url: str, bootstrap: str, broker_pid: int, book: PostgresPriceBook) -> None:
        self.url, self.bootstrap, self.broker_pid, self.book = url, bootstrap, broker_pid, book
        self.run_id = secrets.token_hex(4)

    async def topics(self, phase: str) -> tuple[str, Broker]:
        prefix = f"bench-{self.run_id}-{phase}."
        topics = Topics.named(prefix)
        await ensure_topics(self.bootstrap, {**topics.partitions(), prefix + "scratch": 6})
        return prefix, Broker(self.bootstrap, topics.usage, topics.costs)

    async def reprice(self, window: Window, broker: Broker | None, batch: int) -> Report:
        return await reprice(
            self.url,
            self.book,
            window,
            reason=REASON,
            broker=broker,
            dry_run=broker is None,
            wait_seconds=None,
            batch=batch,
        )


def top(stats: pstats.Stats, key: int, count: int, only: str = "") -> list[str]:
    """The ``count`` entries with the largest ``key`` (2 = own time, 3 = cumulative)."""
    entries = stats.stats  # type: ignore[attr-defined]  # {(file, line, name): (cc, nc, tt, ct, callers)}
    total = max((v[3] for v in entries.values()), default=1.0)
    chosen = sorted(
        ((where, v) for where, v in entries.items() if only in where[0]),
        key=lambda item: item[1][key],
        reverse=True,
    )[:count]
    lines = []
    for (file, line, name), (_cc, calls, own, cumulative, _callers) in chosen:
        place = file.split("site-packages/")[-1].split("/main/")[-1].split("python3.11/")[-1]
        lines.append(
            f"  {own:7.2f} {cumulative:7.2f} {cumulative / total:5.0%} {calls:>9,}  "
            f"{name} ({place}:{line})"
        )
    return lines


async def profile(bench: Run, window: Window, batch: int) -> None:
    """cProfile one dry run and one applied run (fresh topics); print where the time goes."""
    for phase in ("dry", "applied"):
        broker = (await bench.topics("profile"))[1] if phase == "applied" else None
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        report = await bench.reprice(window, broker, batch)
        profiler.disable()
        elapsed = time.perf_counter() - started
        stats = pstats.Stats(profiler)
        print(
            f"\ncProfile, {phase} run: {report.scanned:,} rows, {report.emitted:,} emitted, "
            f"{elapsed:.1f} s under the profiler ({report.scanned / elapsed:,.0f} rows/s)"
        )
        print("     own     cum  %cum     calls  function — by own time")
        print("\n".join(top(stats, 2, 22)))
        print("     own     cum  %cum     calls  function — the project's, by cumulative time")
        print("\n".join(top(stats, 3, 14, only="services/")))


def verdict(rate_: float) -> str:
    return f">= {GOAL:,}/s " + ("met" if rate_ >= GOAL else "MISSED")


async def measure(args: argparse.Namespace, bench: Run, workdir: Path) -> None:
    clock = time.perf_counter()
    n, batch = args.events, args.batch
    print(f"1. generating and loading {n:,} transactions …")
    generating, loading = await load(bench.url, bench.book, n, args.seed)
    effective, threshold = correct(bench.book)
    window = Window(SINCE, SINCE + timedelta(days=DAYS))
    connection = await asyncpg.connect(bench.url)
    try:
        expected = int(
            await connection.fetchval(
                "SELECT count(*) FROM billing_transactions WHERE model = $1"
                " AND occurred_at >= $2 AND prompt_tokens <= $3",
                CORRECTED,
                effective,
                threshold,
            )
        )
        size = await connection.fetchval(
            "SELECT pg_size_pretty(pg_total_relation_size('billing_transactions'))"
        )
    finally:
        await connection.close()
    phases = {"generate (rate + _row)": generating, "COPY + summary + VACUUM": loading}
    print(
        f"   generated in {generating:.1f} s ({n / generating:,.0f} rows/s), loaded in "
        f"{loading:.1f} s; table {size}; correction from {effective:%Y-%m-%d}: "
        f"{expected:,} rows should change ({expected / n:.1%})"
    )

    print("2. reference scans, dry run, applied run …", flush=True)
    refs: list[tuple[int, float]] = []
    async with Cpu(broker=bench.broker_pid) as ref_cpu:
        refs.append(await scan(bench.url, window, batch, ordered=False))
    ordered = await scan(bench.url, window, batch, ordered=True)
    async with Cpu(broker=bench.broker_pid) as dry_cpu:
        started = time.perf_counter()
        dry = await bench.reprice(window, None, batch)
        dry_s = time.perf_counter() - started
    prefix, broker = await bench.topics("applied")
    async with Cpu(broker=bench.broker_pid) as applied_cpu:
        started = time.perf_counter()
        applied = await bench.reprice(window, broker, batch)
        applied_s = time.perf_counter() - started
    refs.append(await scan(bench.url, window, batch, ordered=False))
    for rows, _ in (*refs, ordered):
        if rows != n:
            raise RuntimeError(f"the reference scanned {rows:,} rows of {n:,}")
    for report in (dry, applied):
        if (report.scanned, report.changed, report.unpriced) != (n, expected, 0):
            raise RuntimeError(f"the re-rate saw {report.to_json() | {'diff': '…'}}")
    if applied.emitted != expected or dry.emitted != 0:
        raise RuntimeError(f"emitted {applied.emitted:,} (dry run {dry.emitted}) of {expected:,}")
    ref_s = min(seconds for _, seconds in refs)
    phases |= {"reference scans (3)": sum(s for _, s in (*refs, ordered)),
               "dry run": dry_s, "applied run": applied_s}  # fmt: skip

    print("3. reading the revisions back, raw producer reference …", flush=True)
    started = time.perf_counter()
    records = await read_back(bench.bootstrap, broker.costs_topic, applied.emitted)
    checked = check_revisions(records, applied)
    raw_s = await raw_send(bench.bootstrap, prefix + "scratch", records, batch)
    phases["read back + check + raw send"] = time.perf_counter() - started
    del records

    if args.profile:  # before the projector: it would leave nothing to re-rate
        started = time.perf_counter()
        await profile(bench, window, batch)
        phases["profile (2 runs)"] = time.perf_counter() - started
    projector = None
    if args.with_projector:
        print("4. billing projector applying the revisions …", flush=True)
        projector = await run_projector(bench, prefix, applied, workdir)
        phases["projector (spawn to last adjustment)"] = float(projector["total"])

    ref_rate = n / ref_s
    rows = [
        ("reference: SELECT, cursor (rows/s)", ref_rate, None, "best of 2"),
        ("  same, ORDER BY occurred_at, request_id", n / ordered[1], ref_rate, ""),
        ("reprice dry run (rows scanned/s)", n / dry_s, ref_rate, verdict(n / dry_s)),
        ("reprice applied (rows scanned/s)", n / applied_s, ref_rate, verdict(n / applied_s)),
        ("reprice applied (revisions emitted/s)", applied.emitted / applied_s,
         applied.emitted / raw_s, "reference: raw aiokafka send of the same bytes"),
    ]  # fmt: skip
    print(f"\n{'measurement':<44}{'figure':>11}{'reference':>11}{'ratio':>7}  note")
    for name, figure, reference, note in rows:
        ref_text = f"{reference:>11,.0f}{figure / reference:>7.2f}" if reference else " " * 18
        print(f"{name:<44}{figure:>11,.0f}{ref_text}  {note}")
    if projector is not None:
        print(
            f"{'projector applying them (adjustments/s)':<44}{projector['rate']:>11,.0f}"
            f"{'':>18}  start-up {projector['startup']:.1f} s; {projector['summary']}"
        )
    print(
        f"\nN = {n:,}; changed {applied.changed:,} ({applied.changed / n:.1%}), unpriced "
        f"{applied.unpriced}, Δ {applied.to_json()['delta']} USD; {checked}"
    )
    print(
        f"reference scans {', '.join(f'{s:.1f} s' for _, s in refs)} (ordered {ordered[1]:.1f} s);"
        f" dry run {dry_s:.1f} s; applied {applied_s:.1f} s; raw send {raw_s:.1f} s"
    )
    per_row = (dry_s - ordered[1]) / n * 1e6
    per_revision = (applied_s - dry_s) / max(applied.emitted, 1) * 1e6
    print(
        f"per row: dry run {dry_s / n * 1e6:.1f} µs = its own query {ordered[1] / n * 1e6:.1f} µs"
        f" + {per_row:.1f} µs in Python; emitting: applied - dry run = {per_revision:.1f} µs per"
        f" revision (raw send {raw_s / max(applied.emitted, 1) * 1e6:.1f} µs per message)"
    )
    print(f"CPU (cores): reference [{ref_cpu}]; dry run [{dry_cpu}]; applied [{applied_cpu}]")
    if projector is not None:
        print(f"CPU (cores) while the projector ran: [{projector['cpu']}]")
    print("wall time per phase: " + "; ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    print(f"total {time.perf_counter() - clock:.0f} s")


async def database(workdir: Path) -> tuple[str, EmbeddedPostgres | None]:
    """The server to create the database on: configured, local, else embedded."""
    base = os.environ.get("BILLING_DATABASE_URL") or DEFAULT_DB
    try:
        await (await asyncpg.connect(base, timeout=5)).close()
        return base, None
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        print(f"{base} does not answer ({exc}); starting an embedded PostgreSQL")
        embedded = EmbeddedPostgres(workdir)
        return embedded.start(), embedded


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-reprice-"))
    base, embedded = await database(workdir)
    name = f"bench_reprice_{secrets.token_hex(4)}"
    url = urlunsplit(urlsplit(base)._replace(path=f"/{name}"))
    broker = EmbeddedBroker(log_path=workdir / "tansu.log")
    admin = await asyncpg.connect(base)
    book = None
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        await migrate(url)
        book = PostgresPriceBook(url)
        apply_catalogue(book, default_catalogue(), observed_at=SINCE, source="snapshot")
        broker.start()
        print(
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs, N = {args.events:,}, batch {args.batch:,}; database "
            f"{name}, broker Tansu {broker.bootstrap}"
        )
        await measure(args, Run(url, broker.bootstrap, broker.pid or 0, book), workdir)
    finally:
        if book is not None:
            book.close()
        broker.stop()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 50,000")
    parser.add_argument("--events", type=int, help="N transactions (default 1,000,000)")
    parser.add_argument("--batch", type=int, default=5_000, help="reprice batch and prefetch")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--with-projector", action="store_true", help="also time the projector")
    parser.add_argument("--profile", action="store_true", help="cProfile a dry and an applied run")
    arguments = parser.parse_args()
    arguments.events = arguments.events or (50_000 if arguments.quick else 1_000_000)
    asyncio.run(main(arguments))
