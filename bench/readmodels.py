"""Read models at production volume (issue #10): the billing query API over N transactions,
on the monthly-partitioned table (migration 005) beside the unpartitioned one (001–004).

One run creates two fresh databases on ``BILLING_DATABASE_URL``'s server (else
postgresql://postgres@127.0.0.1:5432): ``bench_readmodels_<hex>_part``, migrated fully, and
``…_flat``, migrated with copies of 001–004 and of the migrations after 005 (006: the
index for pages of one model), so the two differ only in the partitioning. Both get the
same N transactions, generated server-side (``INSERT … SELECT`` over ``generate_series``
in chunks, every value a hash of the row number, so both databases hold identical rows),
the two loads running at once (one backend each):

- ``occurred_at`` spread evenly over the 365 days up to the start of the run (13 UTC
  months; rows arrive in time order, as the projector writes them), one partition per month
  created first with ``services.adapters.partitions``;
- 200 tenants, log-uniformly skewed (the biggest ~13% of the rows, the smallest ~0.1%),
  2–8 API keys each; 20 models, skewed too (23% … 1.6%), priced per token with the bundled
  catalogue's prices (made-up ones for the 8 extra models) written to 12 decimal places,
  so every cost is exact NUMERIC: tokens × price; 80% via OpenRouter with a reported cost;
- ``tenant_billing_summary`` filled from the rows (``INSERT … SELECT … GROUP BY``, a month
  at a time).

To save time and disk the table (each partition) is UNLOGGED while the run lasts (reads
do not differ), loaded with ``synchronous_commit = off`` and without its primary key and
indexes; then VACUUM (ANALYZE) and the primary key and indexes re-created from the
definitions the migrations made. The unpartitioned schema's foreign key
``billing_adjustments → billing_transactions`` is dropped for that (a permanent table cannot
reference an unlogged one) and not restored: no query here touches it.

Then one ``billing gateway`` per database (no broker, usage emission off) answers the tenant
API with a real key per tenant, and each query is timed from this client (sequential
requests on a kept-alive connection; the same parameters for both databases, alternating
which goes first; the two answers must be equal):

1. the first page of ``/v1/billing/transactions`` (limit 100);
2. a deep keyset page: a cursor at a random instant of a random month;
3. one month (``since``/``until``) of one model (uniform over the 20 models);
4. ``/v1/billing/summary?group_by=model`` over one month (the month summary);
5. ``/v1/billing/summary?group_by=day`` over one month (per day; the API has no model ×
   day grouping);

every 4th repetition for the biggest tenant, else a uniformly random one; months uniform
over the 13. ``/healthz`` is timed alike, as the HTTP floor. EXPLAIN (ANALYZE, BUFFERS) of
pages 1–3 for the biggest tenant follows, and of the slowest request of every query that
missed the goal, on the SQL the route runs (taken from the route itself through a
recording pool). Both databases are dropped at the end, whatever happens. The data
(~2 × 27 GB at 50M; ~55 GB of disk at the peak) is larger than this machine's memory:
reads of old months come from disk, on both tables alike.

    flock /tmp/bench.lock .venv/bin/python bench/readmodels.py            # N = 50,000,000
    flock /tmp/bench.lock .venv/bin/python bench/readmodels.py --quick    # N = 1,000,000
    flock /tmp/bench.lock .venv/bin/python bench/readmodels.py --rows 5000000 --repeat 100
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from services.adapters.database import MIGRATIONS_DIR, migrate
from services.adapters.partitions import create_partitions, partition_months
from services.adapters.readmodels import (
    COST_COLUMNS,
    COUNT_COLUMNS,
    SUMMARY_KEY,
    SUMMARY_VALUES,
    TRANSACTION_COLUMNS,
)
from services.adapters.tenants import create_key, create_tenant
from services.core.catalogue import apply_catalogue, default_catalogue
from services.core.periods import month_bounds, month_of, month_range
from services.core.pricebook import InMemoryPriceBook
from services.core.pricing import ModelPricing
from services.gateway import queries
from services.gateway.queries import _encode_cursor as encode_cursor

BILLING = shutil.which("billing", path=os.path.dirname(sys.executable)) or "billing"
DEFAULT_DB = "postgresql://postgres@127.0.0.1:5432/postgres"
GOAL_MS = 50.0
CHUNK = 1_000_000
TENANTS = 200
DAYS = 365
EXTRA_MODELS = {  # (prompt, completion) USD per token, beside the 12 bundled models
    "mistralai/mistral-large": ("0.000002", "0.000006"),
    "qwen/qwen3-235b-a22b": ("0.00000013", "0.0000006"),
    "x-ai/grok-4": ("0.000003", "0.000015"),
    "openai/o3": ("0.000002", "0.000008"),
    "openai/o4-mini": ("0.0000011", "0.0000044"),
    "google/gemini-2.5-flash-lite": ("0.0000001", "0.0000004"),
    "anthropic/claude-3.5-haiku": ("0.0000008", "0.000004"),
    "cohere/command-r-plus": ("0.0000025", "0.00001"),
}
APPS = ["chat", "agent", "batch-summaries", "support-bot", "code-review"]


def price_list() -> tuple[list[str], list[str], list[str]]:
    """20 models and their prompt and completion prices, as 12-decimal strings."""
    catalogue = [
        (e.model, e.pricing.prompt, e.pricing.completion) for e in default_catalogue().entries
    ]
    extra = [(m, Decimal(p), Decimal(c)) for m, (p, c) in EXTRA_MODELS.items()]
    rows = catalogue + extra
    return (
        [m for m, _, _ in rows],
        [f"{p:.12f}" for _, p, _ in rows],
        [f"{c:.12f}" for _, _, c in rows],
    )


# -- the data ---------------------------------------------------------------------------------


def u(hash_name: str, slot: int) -> str:
    """A uniform [0, 1) from 20 bits (slot 0–2) of a 64-bit hash column."""
    return f"((({hash_name} >> {slot * 20}) & 1048575)::float8 / 1048576)"


USAGE_EXPRS = {
    "prompt_tokens": "prompt",
    "uncached_input_tokens": "prompt - cached - written",
    "cache_read_tokens": "cached",
    "cache_write_tokens": "written",
    "cache_write_1h_tokens": "0",
    "completion_tokens": "completion",
    "reasoning_tokens": "reasoning",
    "web_search_requests": "searches",
    "images": "0",
    "requests": "1",
    "prompt_cost": "prompt_cost",
    "cache_read_cost": "cache_read_cost",
    "cache_write_cost": "cache_write_cost",
    "completion_cost": "completion_cost",
    "internal_reasoning_cost": "0",
    "request_cost": "0",
    "web_search_cost": "web_search_cost",
    "image_cost": "0",
    "total_cost": "prompt_cost + cache_read_cost + cache_write_cost + completion_cost"
    " + web_search_cost",
}
"""A generated row's counts and costs, from the columns its query names so: one request, no
1-hour cache writes, nothing priced per request, image or internal reasoning."""
TRANSACTION_EXPRS = {
    "provider_model_id": "model",
    "model": "model",
    "occurred_at": "occurred_at",
    "recorded_at": "occurred_at + interval '50 ms'",
    "usage_source": "'upstream'",
    "currency": "'USD'",
    "reported_is_byok": "false",
    "revision": "1",
    "priced_at": "occurred_at + interval '300 ms'",
    "projected_at": "occurred_at + interval '1 s'",
}
"""The rest of a generated transaction that every generator fills alike."""
GENERATED_COLUMNS = {
    "billing_transactions": (*TRANSACTION_COLUMNS, "projected_at"),
    "tenant_billing_summary": (*SUMMARY_KEY, *SUMMARY_VALUES),
}


def generated_sql(table: str, exprs: dict[str, str], ctes: str, rows: str, hashes: int = 0) -> str:
    """``INSERT INTO table (…) WITH ctes SELECT … FROM rows``: each column of ``table`` the
    expression ``exprs`` gives it, else ``USAGE_EXPRS`` (and ``TRANSACTION_EXPRS``) does. With
    ``hashes``, a first CTE ``drawn`` holds one chunk's rows [$1, $2) of ``generate_series``:
    each row number ``i`` with that many 64-bit hashes of it, named ``a``, ``b``, …"""
    if table == "billing_transactions":
        exprs = TRANSACTION_EXPRS | exprs
    exprs = USAGE_EXPRS | exprs
    columns = GENERATED_COLUMNS[table]
    select = ",\n  ".join(exprs[c] for c in columns)  # KeyError: a column the table grew
    if hashes:
        drawn = (f"hashint8extended(i, {n}) AS {chr(96 + n)}" for n in range(1, hashes + 1))
        ctes = f"""drawn AS (
  SELECT i, {", ".join(drawn)}
  FROM generate_series($1::bigint, $2::bigint - 1) AS i
), {ctes}"""  # noqa: S608 - numbers only
    return f"""
INSERT INTO {table} ({", ".join(columns)})
WITH {ctes}
SELECT
  {select}
FROM {rows}
"""  # noqa: S608 - constants only; every value is a bound parameter


def generator_sql() -> str:
    """INSERT rows [$1, $2) from $3 (start), $4 (seconds per row), $5–$7 (models, prices)."""
    exprs = {
        "request_id": "'gen-' || lpad(to_hex(f), 16, '0') || '-' || i",
        "tenant_id": "'tenant-' || lpad(tenant::text, 3, '0')",
        "api_key_id": "'tenant-' || lpad(tenant::text, 3, '0') || '-key-' || key_no",
        "provider": "provider",
        "total_cost": "total_cost",
        "reported_cost": "CASE WHEN provider = 'openrouter' THEN total_cost END",
        "price_version": "model_no",
        "metadata": "jsonb_build_object('app', app, 'env', 'prod')",
    }
    apps = "ARRAY[" + ", ".join(f"'{a}'" for a in APPS) + "]"
    ctes = f"""shaped AS (
  SELECT i, d, e, f,
    $3::timestamptz + make_interval(secs => (i + {u("a", 0)}) * $4::float8) AS occurred_at,
    floor(power({TENANTS + 1}, {u("a", 1)}))::int AS tenant,
    floor(power(21, {u("a", 2)}))::int AS model_no,
    floor(50 * power(800, {u("b", 0)}))::bigint AS prompt,
    floor(power(4000, {u("b", 1)}))::bigint AS completion,
    {u("b", 2)} < 0.4 AS caches, {u("c", 0)} AS cached_share, {u("c", 1)} AS key_draw,
    {u("c", 2)} < 0.8 AS via_openrouter
  FROM drawn
), counted AS (
  SELECT *, ($5::text[])[model_no] AS model,
    ($6::numeric[])[model_no] AS prompt_price, ($7::numeric[])[model_no] AS completion_price,
    CASE WHEN caches THEN floor(prompt * 0.9 * cached_share)::bigint ELSE 0 END AS cached,
    1 + floor(key_draw * CASE WHEN tenant <= 5 THEN 8 WHEN tenant <= 40 THEN 4 ELSE 2 END)::int
      AS key_no,
    CASE WHEN {u("d", 0)} < 0.4 THEN floor(completion * {u("d", 1)})::bigint ELSE 0 END
      AS reasoning,
    CASE WHEN {u("e", 2)} < 0.02 THEN 1 ELSE 0 END AS searches,
    ({apps})[1 + floor({u("e", 1)} * {len(APPS)})::int] AS app
  FROM shaped
), written AS (
  SELECT *,
    CASE WHEN via_openrouter THEN 'openrouter' ELSE split_part(model, '/', 1) END AS provider,
    CASE WHEN model LIKE 'anthropic/%' AND {u("d", 2)} < 0.3
      THEN floor((prompt - cached) * 0.5 * {u("e", 0)})::bigint ELSE 0 END AS written
  FROM counted
), costed AS (
  SELECT *,
    (prompt - cached - written) * prompt_price AS prompt_cost,
    cached * prompt_price * 0.1 AS cache_read_cost,
    written * prompt_price * 1.25 AS cache_write_cost,
    completion * completion_price AS completion_cost,
    searches * 0.010000000000 AS web_search_cost
  FROM written
)"""  # noqa: S608 - constants and numbers only; every value is a bound parameter
    rows = """(
  SELECT *, prompt_cost + cache_read_cost + cache_write_cost + completion_cost
            + web_search_cost AS total_cost
  FROM costed
) AS rows"""
    return generated_sql("billing_transactions", exprs, ctes, rows, hashes=6)


SUMMARY_SQL = (
    f"INSERT INTO tenant_billing_summary ({', '.join((*SUMMARY_KEY, *SUMMARY_VALUES))})"  # noqa: S608
    " SELECT tenant_id, (occurred_at AT TIME ZONE 'UTC')::date, model, coalesce(api_key_id, ''),"
    f" {', '.join(f'sum({c})' for c in (*COUNT_COLUMNS, *COST_COLUMNS))}"
    " FROM billing_transactions WHERE occurred_at >= $1 AND occurred_at < $2 GROUP BY 1, 2, 3, 4"
)
"""One month of the summary: in one statement, 50M rows' hash aggregate spilled ~16 GB of
temporary files (the disk nearly filled); a month's groups fit in memory."""


class Database:
    """One of the two databases: its URL, how it was loaded, its keys and its gateway."""

    def __init__(self, name: str, url: str, partitioned: bool) -> None:
        self.name, self.url, self.partitioned = name, url, partitioned
        self.label = "partitioned" if partitioned else "unpartitioned"
        self.timings: dict[str, float] = {}
        self.keys: dict[str, str] = {}  # tenant → its API key
        self.gateway: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    async def connect(self) -> asyncpg.Connection:
        connection = await asyncpg.connect(self.url)
        await connection.execute(
            "SET synchronous_commit = off; SET maintenance_work_mem = '2GB';"
            " SET max_parallel_maintenance_workers = 0; SET work_mem = '1GB'"
        )
        return connection

    async def timed(self, phase: str, work: Awaitable[Any]) -> Any:
        started = time.perf_counter()
        result = await work
        self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - started
        return result

    def said(self, phase: str) -> None:
        print(f"  {self.label}: {phase} done in {self.timings[phase]:.0f} s", flush=True)


async def strip(connection: asyncpg.Connection, db: Database) -> list[str]:
    """Drop the transactions' keys and indexes, make the table (partitions) UNLOGGED; return
    the statements that restore the primary key and the indexes, as the migrations made them."""
    keys = await connection.fetch(
        "SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint"
        " WHERE conrelid = 'billing_transactions'::regclass AND contype = 'p'"
    )
    restore = [
        f'ALTER TABLE billing_transactions ADD CONSTRAINT "{r["conname"]}" {r["def"]}' for r in keys
    ]
    indexes = await connection.fetch(
        "SELECT indexrelid::regclass::text AS name, pg_get_indexdef(indexrelid) AS def"
        " FROM pg_index WHERE indrelid = 'billing_transactions'::regclass AND NOT EXISTS"
        " (SELECT 1 FROM pg_constraint WHERE conindid = indexrelid) ORDER BY 1"
    )
    # A partitioned table's index reads "ON ONLY": re-created on the parent, it must recurse.
    restore += [r["def"].replace(" ON ONLY ", " ON ", 1) for r in indexes]
    for fk in await connection.fetch(
        "SELECT conname, conrelid::regclass::text AS tab FROM pg_constraint"
        " WHERE confrelid = 'billing_transactions'::regclass AND contype = 'f'"
    ):
        await connection.execute(f'ALTER TABLE {fk["tab"]} DROP CONSTRAINT "{fk["conname"]}"')
    for index in indexes:
        await connection.execute(f"DROP INDEX {index['name']}")
    for key in keys:
        await connection.execute(
            f'ALTER TABLE billing_transactions DROP CONSTRAINT "{key["conname"]}"'
        )
    tables = ["billing_transactions"]
    if db.partitioned:
        tables = [
            str(r[0])
            for r in await connection.fetch(
                "SELECT relid::text FROM pg_partition_tree('billing_transactions') WHERE isleaf"
            )
        ]
    for table in tables:
        await connection.execute(f"ALTER TABLE {table} SET UNLOGGED")
    return restore


async def load(db: Database, n: int, start: datetime, progress: dict[str, int]) -> None:
    """Generate the N rows into ``db``, restore its indexes, fill the summary, make keys."""
    connection = await db.connect()
    try:
        if db.partitioned:
            last = start + timedelta(days=DAYS)
            await create_partitions(connection, month_range(month_of(start), month_of(last)))
        restore = await strip(connection, db)
        models, prompt_prices, completion_prices = price_list()
        sql, step = generator_sql(), DAYS * 86_400 / n
        for low in range(0, n, CHUNK):
            high = min(low + CHUNK, n)
            args = (low, high, start, step, models, prompt_prices, completion_prices)
            await db.timed("insert", connection.execute(sql, *args))
            progress[db.label] = high
        db.said("insert")
        await db.timed("vacuum", connection.execute("VACUUM (ANALYZE) billing_transactions"))
        db.said("vacuum")
        for statement in restore:
            await db.timed("indexes", connection.execute(statement))
        db.said("indexes")
        for month in month_range(month_of(start), month_of(start + timedelta(days=DAYS))):
            await db.timed("summary", connection.execute(SUMMARY_SQL, *month_bounds(month)))
        db.said("summary")
        await connection.execute("VACUUM (ANALYZE) tenant_billing_summary")
        for t in range(1, TENANTS + 1):
            tenant = f"tenant-{t:03d}"
            await create_tenant(connection, tenant)
            db.keys[tenant] = (await create_key(connection, tenant, "bench"))[1]
    finally:
        await connection.close()


async def report_progress(progress: dict[str, int], n: int) -> None:
    started = time.perf_counter()
    done = 0
    while done < 2 * n:  # then each database says when each later phase is done
        await asyncio.sleep(15)
        done = sum(progress.values())
        elapsed = time.perf_counter() - started
        rate = done / elapsed
        eta = (2 * n - done) / rate if rate else float("nan")
        parts = ", ".join(f"{k} {v:,}" for k, v in progress.items())
        print(
            f"  generated {parts} of {n:,} — {rate:,.0f} rows/s,"
            f" inserts done in ~{eta / 60:.0f} min",
            flush=True,
        )


async def sizes(db: Database) -> str:
    connection = await asyncpg.connect(db.url)
    try:
        # pg_partition_tree lists a plain table as its own (only) leaf only when partitioned
        tables = "SELECT relid FROM pg_partition_tree('billing_transactions') WHERE isleaf"
        if not db.partitioned:
            tables = "SELECT 'billing_transactions'::regclass AS relid"
        row = await connection.fetchrow(
            "SELECT sum(pg_table_size(relid)) AS heap, sum(pg_indexes_size(relid)) AS idx,"  # noqa: S608
            f" count(*) AS leaves FROM ({tables}) AS t"
        )
        summary = await connection.fetchrow(
            "SELECT count(*) AS n, pg_total_relation_size('tenant_billing_summary') AS size"
            " FROM tenant_billing_summary"
        )
    finally:
        await connection.close()
    gb = 1 << 30
    tables = f"{row['leaves']} partitions" if db.partitioned else "1 table"
    return (
        f"{db.label:<14} transactions {row['heap'] / gb:5.1f} GB heap + {row['idx'] / gb:4.1f} GB"
        f" indexes ({tables}); summary {summary['n']:,} rows, {summary['size'] / gb:.2f} GB"
    )


# -- the gateways and the measurements --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def price_book() -> InMemoryPriceBook:
    """The bundled catalogue plus the extra models: what the gateways' books hold."""
    book = InMemoryPriceBook()
    apply_catalogue(
        book, default_catalogue(), observed_at=datetime(2020, 1, 1, tzinfo=UTC), source="snapshot"
    )
    for model, (prompt, completion) in EXTRA_MODELS.items():
        book.record(model, ModelPricing(prompt=Decimal(prompt), completion=Decimal(completion)),
                    effective_from=datetime(2020, 1, 1, tzinfo=UTC))  # fmt: skip
    return book


def register_extra_models(db: Database) -> None:
    """The extra models' prices in ``db``'s price book (``billing prices set``), so the
    gateway knows them as it knows every model it has transactions of."""
    env = os.environ | {"BILLING_DATABASE_URL": db.url}
    for model, (prompt, completion) in EXTRA_MODELS.items():
        subprocess.run(
            [BILLING, "prices", "set", model, "--prompt", prompt, "--completion", completion,
             "--effective-from", "2020-01-01T00:00:00Z", "--reason", "bench/readmodels.py"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip


async def start_gateway(db: Database, workdir: Path) -> None:
    """``billing gateway`` on ``db``: no broker, no emission, no catalogue sync."""
    port, data_dir = free_port(), workdir / db.label
    data_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "BILLING_KAFKA_BOOTSTRAP"}
    env |= {"BILLING_DATABASE_URL": db.url, "BILLING_DATA_DIR": str(data_dir),
            "BILLING_CATALOGUE_SYNC": "false", "BILLING_EMIT_USAGE": "false"}  # fmt: skip
    with (workdir / f"{db.label}.log").open("ab") as log:
        db.gateway = subprocess.Popen(
            [BILLING, "gateway", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    db.base_url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as client:
        for _ in range(600):
            if db.gateway.poll() is not None:
                tail = (workdir / f"{db.label}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the {db.label} gateway exited:\n{tail}")
            try:
                if (await client.get(f"{db.base_url}/readyz", timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the {db.label} gateway did not become ready in 60 s")


def stop_gateway(db: Database) -> None:
    if db.gateway is not None and db.gateway.poll() is None:
        db.gateway.send_signal(signal.SIGTERM)
        try:
            db.gateway.wait(20)
        except subprocess.TimeoutExpired:
            db.gateway.kill()
            db.gateway.wait()


Request = tuple[str, str, dict[str, str]]  # tenant, path, params


class Workload:
    """Random parameters for each query: tenants, months, instants and models."""

    def __init__(self, seed: int, start: datetime) -> None:
        self.rng = random.Random(seed)
        self.start, self.end = start, start + timedelta(days=DAYS)
        self.months = month_range(month_of(self.start), month_of(self.end))
        self.models = price_list()[0]
        self.count = 0

    def tenant(self) -> str:
        self.count += 1
        return "tenant-001" if self.count % 4 == 1 else f"tenant-{self.rng.randint(1, TENANTS):03d}"

    def month(self) -> tuple[datetime, datetime]:
        return month_bounds(self.rng.choice(self.months))

    def first_page(self) -> Request:
        return self.tenant(), "/v1/billing/transactions", {"limit": "100"}

    def deep_page(self) -> Request:
        since, until = self.month()
        since, until = max(since, self.start), min(until, self.end)
        instant = since + (until - since) * self.rng.random()
        cursor = encode_cursor(instant, "gen-")
        return self.tenant(), "/v1/billing/transactions", {"limit": "100", "cursor": cursor}

    def model_month_page(self) -> Request:
        since, until = self.month()
        params = {
            "limit": "100",
            "since": since.isoformat(),
            "until": until.isoformat(),
            "model": self.rng.choice(self.models),
        }
        return self.tenant(), "/v1/billing/transactions", params

    def summary(self, group_by: str) -> Callable[[], Request]:
        def make() -> Request:
            since, until = self.month()
            params = {
                "group_by": group_by,
                "since": since.date().isoformat(),
                "until": until.date().isoformat(),
            }
            return self.tenant(), "/v1/billing/summary", params

        return make

    def floor(self) -> Request:
        return self.tenant(), "/healthz", {}


async def timed_get(
    client: httpx.AsyncClient, db: Database, request: Request
) -> tuple[float, bytes]:
    tenant, path, params = request
    headers = {"authorization": f"Bearer {db.keys[tenant]}"}
    started = time.perf_counter()
    response = await client.get(db.base_url + path, params=params, headers=headers)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(
            f"{db.label} {path} {params}: {response.status_code} {response.text[:300]}"
        )
    return elapsed * 1000, response.content


async def measure(
    dbs: list[Database], make: Callable[[], Request], repeat: int, warm: int
) -> tuple[dict[str, list[float]], Request]:
    """``repeat`` timed requests per database (after ``warm`` untimed), in alternating order;
    the times and the request that took longest on either database."""
    times: dict[str, list[float]] = {db.label: [] for db in dbs}
    slowest, worst = make(), 0.0
    async with httpx.AsyncClient(timeout=120) as client:
        for i in range(warm + repeat):
            request = make()
            order = dbs if i % 2 else dbs[::-1]
            answers = {}
            for db in order:
                elapsed, body = await timed_get(client, db, request)
                answers[db.label] = body
                if i >= warm:
                    times[db.label].append(elapsed)
                    if elapsed > worst:
                        slowest, worst = request, elapsed
            if request[1] != "/healthz" and len(set(answers.values())) != 1:
                raise RuntimeError(f"the databases answered {request} differently")
    return times, slowest


def percentile(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


class RecordingPool:
    """Stands in for the gateway's pool: keeps the SQL a route runs instead of running it."""

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        self.sql, self.args = sql, args
        return []


async def route_sql(request: Request) -> tuple[str, tuple[Any, ...]]:
    """The SQL and arguments the route behind ``request`` runs (taken from the route itself)."""
    tenant, path, params = request
    pool = RecordingPool()
    book = SimpleNamespace(book=price_book())
    state = SimpleNamespace(resources=SimpleNamespace(pool=pool, prices=book))
    fake = SimpleNamespace(app=SimpleNamespace(state=state))
    since, until = params.get("since"), params.get("until")
    if path.endswith("/summary"):
        day = date.fromisoformat
        await queries.summary(
            fake,
            tenant,
            day(since) if since else None,
            day(until) if until else None,
            params["group_by"],
        )
    else:
        stamp = datetime.fromisoformat
        await queries.transactions(
            fake,
            tenant,
            params.get("api_key_id"),
            params.get("model"),
            stamp(since) if since else None,
            stamp(until) if until else None,
            int(params.get("limit", "100")),
            params.get("cursor"),
        )
    return pool.sql, pool.args


async def explain(db: Database, sql: str, args: tuple[Any, ...]) -> list[str]:
    connection = await asyncpg.connect(db.url)
    try:
        rows = await connection.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}", *args)
    finally:
        await connection.close()
    return prune([r[0] for r in rows])


def prune(lines: list[str]) -> list[str]:
    """The plan without the nodes that never ran (a partition after the page was full)."""
    shown, skipping_below, pruned = [], -1, 0
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if skipping_below >= 0 and indent > skipping_below:
            continue
        skipping_below = -1
        if "(never executed)" in line:
            skipping_below, pruned = indent, pruned + 1
            continue
        shown.append(line)
    if pruned:
        shown.append(f"({pruned} plan nodes never executed: not shown)")
    return shown


async def explain_pages(dbs: list[Database], start: datetime) -> None:
    """The transactions pages for the biggest tenant, in the middle month."""
    months = month_range(month_of(start), month_of(start + timedelta(days=DAYS)))
    since, until = month_bounds(months[len(months) // 2])
    deep = encode_cursor(since + (until - since) / 2, "gen-")
    path, fifth_model = "/v1/billing/transactions", price_list()[0][4]
    cases: dict[str, Request] = {
        "first page": ("tenant-001", path, {}),
        "deep page (cursor mid-month)": ("tenant-001", path, {"cursor": deep}),
        "one month, one model (the 5th most used)": (
            "tenant-001",
            path,
            {"since": since.isoformat(), "until": until.isoformat(), "model": fifth_model},
        ),
    }
    for title, request in cases.items():
        await explain_both(dbs, f"{title}, tenant-001", request)


async def explain_both(dbs: list[Database], title: str, request: Request) -> None:
    sql, args = await route_sql(request)
    for db in dbs:
        print(f"\n-- EXPLAIN (ANALYZE, BUFFERS) {title}, {db.label}:")
        for line in await explain(db, sql, args):
            print(f"   {line}")


# -- the run ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace, dbs: list[Database], workdir: Path) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=DAYS)
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()},"
        f" {os.cpu_count()} CPUs, N = {args.rows:,} per database,"
        f" {args.repeat} repetitions per query"
    )
    print(
        f"databases {', '.join(db.name for db in dbs)};"
        f" occurred_at {start:%Y-%m-%d} … {start + timedelta(days=DAYS):%Y-%m-%d}"
    )
    progress = dict.fromkeys((db.label for db in dbs), 0)
    reporter = asyncio.create_task(report_progress(progress, args.rows))
    clock = time.perf_counter()
    try:
        await asyncio.gather(*(load(db, args.rows, start, progress) for db in dbs))
    finally:
        reporter.cancel()
    print(f"loaded both in {time.perf_counter() - clock:.0f} s (at once, one backend each):")
    for db in dbs:
        print("  " + await sizes(db))
        print("  " + " " * 15 + "; ".join(f"{k} {v:.0f} s" for k, v in db.timings.items()))

    for db in dbs:
        register_extra_models(db)
        await start_gateway(db, workdir)
    workload = Workload(args.seed, start)
    queries_ = {
        "HTTP floor: /healthz": workload.floor,
        "transactions: first page": workload.first_page,
        "transactions: deep keyset page": workload.deep_page,
        "transactions: one month, one model": workload.model_month_page,
        "summary: month by model": workload.summary("model"),
        "summary: month by day": workload.summary("day"),
    }
    results = {}
    for name, make in queries_.items():
        clock = time.perf_counter()
        results[name] = await measure(dbs, make, args.repeat, args.warm)
        print(f"  measured {name} in {time.perf_counter() - clock:.0f} s", flush=True)

    part, flat = (db.label for db in dbs)
    print(
        f"\n{'query (ms)':<36}{'part p50':>9}{'p99':>8}{'flat p50':>10}{'p99':>8}"
        f"{'p99 ratio':>11}  goal ≤ {GOAL_MS:.0f} ms p99"
    )
    for name, (times, _) in results.items():
        p = [percentile(times[label], q) for label in (part, flat) for q in (50, 99)]
        verdict = "" if name.startswith("HTTP") else ("met" if p[1] <= GOAL_MS else "MISSED")
        print(
            f"{name:<36}{p[0]:>9.1f}{p[1]:>8.1f}{p[2]:>10.1f}{p[3]:>8.1f}"
            f"{p[1] / p[3]:>11.2f}  {verdict}"
        )
    print(
        "(part = partitioned by month, flat = unpartitioned; ratio = partitioned ÷ unpartitioned;"
        " every answer compared equal between the two)"
    )
    for name, (times, slowest) in results.items():
        over = {label: sum(t > GOAL_MS for t in times[label]) for label in (part, flat)}
        worst = {label: max(times[label]) for label in (part, flat)}
        print(
            f"  {name}: slowest {worst[part]:.0f} / {worst[flat]:.0f} ms, over {GOAL_MS:.0f} ms"
            f" {over[part]} / {over[flat]} of {len(times[part])}; slowest request {slowest}"
        )
    await explain_pages(dbs, start)
    for name, (times, slowest) in results.items():
        if not name.startswith("HTTP") and max(percentile(times[x], 99) for x in times) > GOAL_MS:
            title = f"{name}, its slowest request, again (the cache is warmer now)"
            await explain_both(dbs, title, slowest)


async def main(args: argparse.Namespace) -> None:
    base = os.environ.get("BILLING_DATABASE_URL") or DEFAULT_DB
    stem = f"bench_readmodels_{secrets.token_hex(4)}"
    dbs = [
        Database(
            f"{stem}_{suffix}",
            urlunsplit(urlsplit(base)._replace(path=f"/{stem}_{suffix}")),
            suffix == "part",
        )
        for suffix in ("part", "flat")
    ]
    workdir = Path(tempfile.mkdtemp(prefix="bench-readmodels-"))
    flat_migrations = workdir / "migrations-001-004"
    flat_migrations.mkdir()
    for path in sorted(MIGRATIONS_DIR.glob("00[1-4]_*.sql")):
        shutil.copy(path, flat_migrations / path.name)
    # Later indexes go on both tables (as the next numbers, no gap): the pair differs only
    # in the partitioning.
    for number, path in enumerate(sorted(MIGRATIONS_DIR.glob("0*_*.sql"))[5:], start=5):
        shutil.copy(path, flat_migrations / f"{number:03d}{path.name[3:]}")
    admin = await asyncpg.connect(base)
    task = asyncio.current_task()
    assert task is not None  # noqa: S101 - inside asyncio.run
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        for db in dbs:
            await admin.execute(f'CREATE DATABASE "{db.name}"')
        await migrate(dbs[0].url)
        await migrate(dbs[1].url, directory=flat_migrations)
        connection = await asyncpg.connect(dbs[0].url)
        try:
            if not await partition_months(connection):
                raise RuntimeError("migration 005 did not partition billing_transactions")
        finally:
            await connection.close()
        await run(args, dbs, workdir)
    finally:
        for db in dbs:
            stop_gateway(db)
        for db in dbs:
            await admin.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')
        await admin.close()
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"dropped {', '.join(db.name for db in dbs)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1,000,000")
    parser.add_argument("--rows", type=int, help="N transactions per database (default 50,000,000)")
    parser.add_argument(
        "--repeat", type=int, default=200, help="timed requests per query and database"
    )
    parser.add_argument("--warm", type=int, default=10, help="untimed requests first")
    parser.add_argument("--seed", type=int, default=1)
    arguments = parser.parse_args()
    arguments.rows = arguments.rows or (1_000_000 if arguments.quick else 50_000_000)
    asyncio.run(main(arguments))
