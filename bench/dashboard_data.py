"""The data of ``bench/dashboard.py``: 30 days of traffic at 1,000 requests/s, generated
server-side (``INSERT … SELECT`` over ``generate_series``; every value a hash of its key).

What is generated, and what is not:

- ``tenant_billing_summary`` and ``billing_spend_minutes`` hold the whole volume:
  ``rate`` × the window's seconds requests (2,592,000,000 at 1,000/s over 30 days), split
  over the tenants (Zipf: the n-th gets a share ∝ 1/n, so the first, the one the tenant view
  shows, ~22% of 50), over every minute (a daily cycle ±35% peaking at 12:00 UTC, weekends
  at 80%, ±10% noise), then over 10 models of the bundled catalogue and 2-6 API keys per
  tenant (real keys, made with ``services.adapters.tenants``). Counts are requests ×
  plausible tokens per request; every cost is tokens × the catalogue's price, exact
  NUMERIC. The minutes of each tenant-day add up exactly to its summary rows (requests and
  cost): both are apportioned from the same totals by telescoping sums, and checked. Rows
  are written in time order, as the projector adds them (but each once: the projector's
  upserts of the current day and minute leave dead tuples that this does not).
- Optionally (``history_days``), whole days before the window in the summary only, at about
  the same rate: what a service that has run longer holds (the minutes keep 35 days).
- ``billing_transactions`` cannot hold 2.6e9 rows here: ``transactions`` real rows are
  generated (default 5,000,000) in the monthly partitions, the newest ``dense_seconds``
  (default the last hour) at the full 1,000/s, the rest spread evenly over the rest of the
  30 days; same tenants, keys, models and shapes, but they do not add up to the summary.
  The first view reads one keyset page of a tenant's newest rows through an index, which
  costs the same at any table size; the operator's drift panel (not in the first view)
  reads the last hour of rows, which is there at its real size.
- The months of the summary that are over are invoiced (``close_month``, as ``billing
  invoices close`` does): one issued invoice per tenant. No credit grants, budgets,
  adjustments or quota spend (the balance panel shows a postpaid tenant).

The transactions table is loaded UNLOGGED without its keys and indexes (as
``bench/readmodels.py`` does, with its ``strip``), then the keys and indexes are rebuilt and
every table VACUUM (ANALYZE)d.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import TypeVar

import asyncpg
from readmodels import generated_sql, strip, u

from services.adapters.partitions import create_partitions
from services.adapters.tenants import create_key, create_tenant
from services.core.catalogue import default_catalogue
from services.core.periods import month_bounds, month_of, month_range
from services.jobs.invoicing import close_month

MODELS = 10
MODEL_SHARES = (0.20, 0.06, 0.03, 0.14, 0.16, 0.08, 0.12, 0.11, 0.04, 0.06)
"""Of the first 10 catalogue models (Claude Sonnet, Haiku, Opus, GPT-5, -mini, 4.1, 4o,
4o-mini, Gemini Pro, Flash)."""
PROMPT_MEAN = (3200, 1800, 4200, 2200, 1200, 1600, 1400, 900, 2600, 1100)
COMPLETION_MEAN = (420, 260, 600, 380, 220, 300, 280, 160, 450, 200)
REASONING = (0.3, 0.2, 0.3, 0.4, 0.35, 0, 0, 0, 0.4, 0.25)
"""Share of completion tokens spent reasoning."""
KEY_NAMES = ("prod", "staging", "batch", "ci", "eval", "dev")
CHUNK = 500_000
LOADERS = 2
"""Backends inserting transactions at once (this machine has 2 CPUs)."""
T = TypeVar("T")


@dataclass(frozen=True)
class Shape:
    tenants: int
    rate: int
    """Requests per second, all tenants together."""
    days: int
    transactions: int
    dense_seconds: int
    history_days: int
    """Whole days before the window in the summary only (0: none)."""
    end: datetime
    """A whole UTC minute: the window is [end - days, end)."""

    @property
    def start(self) -> datetime:
        return self.end - timedelta(days=self.days)

    @property
    def requests(self) -> int:
        return self.rate * self.days * 86_400

    def tenant(self, n: int) -> str:
        return f"tenant-{n:02d}"

    def keys_of(self, n: int) -> int:
        return 6 if n == 1 else 4 if n <= 10 else 2


@dataclass
class Generated:
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    """tenant → (key id, key) of the key it signs in with (its "prod" key)."""
    timings: dict[str, float] = field(default_factory=dict)
    invoices: int = 0


class Steps:
    """Times each step and says so as it ends."""

    def __init__(self, generated: Generated) -> None:
        self.generated = generated

    async def run(self, name: str, work: Awaitable[T]) -> T:
        started = time.perf_counter()
        result = await work
        elapsed = time.perf_counter() - started
        self.generated.timings[name] = elapsed
        print(f"  {name}: {elapsed:.1f} s", flush=True)
        return result


# -- the model list and its prices -------------------------------------------------------------


def catalogue() -> dict[str, list[str]]:
    """The 10 models' prices per token as decimal strings ('0' where the catalogue has none)."""
    entries = default_catalogue().entries[:MODELS]
    if len(entries) < MODELS:
        raise RuntimeError(f"the bundled catalogue has {len(entries)} models, need {MODELS}")

    def price(value: Decimal | None) -> str:
        return format(value or Decimal(0), "f")

    anthropic = [e.model.startswith("anthropic/") for e in entries]
    return {
        "model": [e.model for e in entries],
        "prompt": [price(e.pricing.prompt) for e in entries],
        "completion": [price(e.pricing.completion) for e in entries],
        "cache_read": [price(e.pricing.input_cache_read) for e in entries],
        # Only Anthropic models write to the cache here (Gemini Flash's write price has 15
        # digits: its costs would not fit the 12 places the minutes are apportioned to).
        "cache_write": [price(e.pricing.input_cache_write if a else None)
                        for e, a in zip(entries, anthropic, strict=True)],
        "cache_write_1h": [price(e.pricing.input_cache_write_1h if a else None)
                           for e, a in zip(entries, anthropic, strict=True)],
        "web_search": [price(e.pricing.web_search) for e in entries],
    }  # fmt: skip


def cumulative(shares: list[float]) -> list[float]:
    """Lower bounds of each share's bucket in [0, 1) (for ``width_bucket``)."""
    total, bounds = sum(shares), [0.0]
    for share in shares[:-1]:
        bounds.append(bounds[-1] + share / total)
    return bounds


def tenant_shares(shape: Shape) -> list[float]:
    weights = [1 / n for n in range(1, shape.tenants + 1)]
    return [w / sum(weights) for w in weights]


# -- the SQL ---------------------------------------------------------------------------------------

MINUTES_SQL = f"""
CREATE TEMP TABLE bench_minutes AS
WITH cells AS (
  SELECT t, minute, round(1e6 * ($1::float8[])[t]
      * (1 + 0.35 * sin(2 * pi() * ((extract(epoch FROM minute)::bigint / 60) % 1440 - 360)
                        / 1440))
      * CASE WHEN extract(isodow FROM minute AT TIME ZONE 'UTC') >= 6 THEN 0.8 ELSE 1 END
      * (0.9 + 0.2 * {u("h", 0)}))::bigint AS w
  FROM generate_series(1, array_length($1::float8[], 1)) AS t,
       generate_series($2::timestamptz, $3::timestamptz - interval '1 minute',
                       interval '1 minute') AS minute,
       LATERAL (SELECT hashint8extended(
                  t::bigint * 100000000 + extract(epoch FROM minute)::bigint / 60, 7) AS h
               ) AS hashed
), running AS (
  SELECT t, minute, w, sum(w) OVER (ORDER BY t, minute ROWS UNBOUNDED PRECEDING) AS upto,
         sum(w) OVER () AS total
  FROM cells
)
SELECT t, minute, (minute AT TIME ZONE 'UTC')::date AS day,
       (div($4::numeric * upto, total) - div($4::numeric * (upto - w), total))::bigint
         AS requests
FROM running
"""  # noqa: S608 - constants only; every value is a bound parameter
"""Requests per tenant (index ``t``) and minute: the window's total apportioned by weight,
as differences of the rounded running total, so they add up to it exactly."""

SUMMARY_EXPRS = {
    "tenant_id": "($2::text[])[t]",
    "day": "day",
    "model": "($13::text[])[m]",
    "api_key_id": "($14::text[])[($15::int[])[t] + k - 1]",
    "uncached_input_tokens": "prompt - cached - written - written_1h",
    "cache_write_1h_tokens": "written_1h",
    "requests": "r",
}
"""The summary's own columns; the counts and costs as in every generated row."""


def summary_sql() -> str:
    """Each tenant-day's requests apportioned over model × key cells (the same telescoping),
    then tokens and costs per cell."""
    ctes = f"""cells AS (
  SELECT t, day, d, m, k, hashtextextended(t || '/' || day || '/' || m || '/' || k, 7) AS h,
         hashtextextended(t || '/' || day || '/' || m || '/' || k, 8) AS g
  FROM bench_days, generate_series(1, {MODELS}) AS m,
       LATERAL generate_series(1, ($3::int[])[t]) AS k
), weighed AS (
  SELECT *, round(1e6 * ($1::float8[])[m] * ln((k + 1.0) / k) / ln(($3::int[])[t] + 1.0)
                  * (0.85 + 0.3 * {u("g", 0)}))::bigint AS w
  FROM cells
), split AS (
  SELECT *, sum(w) OVER (PARTITION BY t, day ORDER BY m, k ROWS UNBOUNDED PRECEDING) AS upto,
         sum(w) OVER (PARTITION BY t, day) AS total
  FROM weighed
), counted AS (
  SELECT t, day, m, k, h,
         (div(d * upto, total) - div(d * (upto - w), total))::bigint AS r
  FROM split
), tokens AS (
  SELECT *, round(r * ($4::int[])[m] * (0.85 + 0.3 * {u("h", 0)}))::bigint AS prompt,
         round(r * ($5::int[])[m] * (0.85 + 0.3 * {u("h", 1)}))::bigint AS completion
  FROM counted WHERE r > 0
), shaped AS (
  SELECT *,
    CASE WHEN ($9::numeric[])[m] > 0 THEN floor(prompt * 0.3 * (0.8 + 0.4 * {u("h", 2)}))
         ELSE 0 END::bigint AS cached,
    CASE WHEN ($10::numeric[])[m] > 0 THEN floor(prompt * 0.04) ELSE 0 END::bigint AS written,
    CASE WHEN ($11::numeric[])[m] > 0 THEN floor(prompt * 0.01) ELSE 0 END::bigint AS written_1h,
    floor(completion * ($6::float8[])[m])::bigint AS reasoning,
    CASE WHEN ($12::numeric[])[m] > 0 THEN r / 100 ELSE 0 END AS searches
  FROM tokens
), costed AS (
  SELECT *,
    (prompt - cached - written - written_1h) * ($7::numeric[])[m] AS prompt_cost,
    cached * ($9::numeric[])[m] AS cache_read_cost,
    written * ($10::numeric[])[m] + written_1h * ($11::numeric[])[m] AS cache_write_cost,
    completion * ($8::numeric[])[m] AS completion_cost,
    searches * ($12::numeric[])[m] AS web_search_cost
  FROM shaped
)"""  # noqa: S608 - constants only; every value is a bound parameter
    rows = "costed\nORDER BY day, t, m, k"
    return generated_sql("tenant_billing_summary", SUMMARY_EXPRS, ctes, rows)


SPEND_MINUTES_SQL = """
INSERT INTO billing_spend_minutes (tenant_id, minute, requests, total_cost)
WITH day_cost AS (
  SELECT tenant_id, day, sum(total_cost) AS cost, sum(requests) AS d
  FROM tenant_billing_summary GROUP BY tenant_id, day
), running AS (
  SELECT t, minute, day, requests,
    sum(requests) OVER (PARTITION BY t, day ORDER BY minute ROWS UNBOUNDED PRECEDING) AS upto
  FROM bench_minutes
)
SELECT tenant_id, minute, requests,
  round(cost * upto / d, 12) - round(cost * (upto - requests) / d, 12)
FROM running JOIN day_cost ON tenant_id = ($1::text[])[t] AND day_cost.day = running.day
WHERE requests > 0
ORDER BY minute, tenant_id
"""
"""Each tenant-day's cost apportioned over its minutes by their requests (telescoping again:
they add up to the day's summary cost exactly when that has at most 12 places); in time
order, as the projector adds them."""

DAYS_SQL = """
CREATE TEMP TABLE bench_days AS
SELECT t, day, sum(requests)::bigint AS d FROM bench_minutes GROUP BY t, day
"""
HISTORY_SQL = f"""
INSERT INTO bench_days
SELECT t, day, round($2::float8 * 86400 * ($1::float8[])[t]
    * CASE WHEN extract(isodow FROM day) >= 6 THEN 0.8 ELSE 1 END / 0.943
    * (0.9 + 0.2 * {u("h", 0)}))::bigint
FROM generate_series(1, array_length($1::float8[], 1)) AS t,
     generate_series($3::date, $4::date - 1, interval '1 day') AS days,
     LATERAL (SELECT days::date AS day) AS named,
     LATERAL (SELECT hashint8extended(t::bigint * 100000 + (day - date '2000-01-01'), 9) AS h
             ) AS hashed
"""  # noqa: S608 - constants only; every value is a bound parameter
"""Whole days before the window, for the summary only (about ``rate``/s: weekdays 1.06×,
weekends 0.85×, ±10%): what a service that has run longer holds (the minutes keep 35 days)."""

CHECK_SQL = """
SELECT count(*) FROM (
  SELECT tenant_id, (minute AT TIME ZONE 'UTC')::date AS day, sum(requests) AS r,
         sum(total_cost) AS c FROM billing_spend_minutes GROUP BY 1, 2) AS m
FULL JOIN (
  SELECT tenant_id, day, sum(requests) AS r, sum(total_cost) AS c
  FROM tenant_billing_summary WHERE day >= $1 GROUP BY 1, 2) AS s USING (tenant_id, day)
WHERE m.r IS DISTINCT FROM s.r OR m.c IS DISTINCT FROM s.c
"""
"""Tenant-days whose minutes and summary rows disagree (0 expected)."""


def transactions_sql() -> str:
    """INSERT rows [$1, $2): row i < $3 at $4 + (i + u) × $5 s, later rows at $6 + (i − $3 +
    u) / $7 s (the dense tail at the full rate); tenants, models and keys as in the summary."""
    exprs = {
        "request_id": "'gen-' || lpad(to_hex(i), 12, '0')",
        "tenant_id": "($9::text[])[t]",
        "api_key_id": "($17::text[])[($18::int[])[t] + k - 1]",
        "provider": "CASE WHEN via_openrouter THEN 'openrouter' ELSE split_part(model, '/', 1) END",
        "reported_cost": "CASE WHEN via_openrouter THEN prompt_cost + cache_read_cost"
        " + cache_write_cost + completion_cost + web_search_cost END",
        "price_version": "m",
        "metadata": "'{}'::jsonb",
    }
    ctes = f"""shaped AS (
  SELECT i, b, c,
    CASE WHEN i < $3 THEN $4::timestamptz + make_interval(secs => (i + {u("a", 0)}) * $5)
         ELSE $6::timestamptz + make_interval(secs => (i - $3 + {u("a", 0)}) / $7) END
      AS occurred_at,
    width_bucket({u("a", 1)}, $8::float8[]) AS t,
    width_bucket({u("a", 2)}, $10::float8[]) AS m
  FROM drawn
), tokens AS (
  SELECT *, ($11::text[])[m] AS model,
    floor(power(($19::int[])[t] + 1, {u("b", 0)}))::int AS k,
    floor(($12::int[])[m] * (0.25 + 1.5 * {u("b", 1)}))::bigint AS prompt,
    floor(($13::int[])[m] * (0.25 + 1.5 * {u("b", 2)}))::bigint AS completion,
    {u("c", 2)} < 0.8 AS via_openrouter
  FROM shaped
), counted AS (
  SELECT *,
    CASE WHEN ($15::numeric[])[m] > 0 THEN floor(prompt * 0.6 * {u("c", 0)}) ELSE 0 END::bigint
      AS cached,
    CASE WHEN ($16::numeric[])[m] > 0 THEN floor(prompt * 0.08 * {u("c", 1)}) ELSE 0 END::bigint
      AS written,
    floor(completion * ($20::float8[])[m] * 2 * {u("c", 1)})::bigint AS reasoning,
    CASE WHEN ($21::numeric[])[m] > 0 AND {u("c", 2)} < 0.008 THEN 1 ELSE 0 END AS searches
  FROM tokens
), costed AS (
  SELECT *,
    (prompt - cached - written) * ($14::numeric[])[m] AS prompt_cost,
    cached * ($15::numeric[])[m] AS cache_read_cost,
    written * ($16::numeric[])[m] AS cache_write_cost,
    completion * ($22::numeric[])[m] AS completion_cost,
    searches * ($21::numeric[])[m] AS web_search_cost
  FROM counted
)"""  # noqa: S608 - constants only; every value is a bound parameter
    return generated_sql("billing_transactions", exprs, ctes, "costed", hashes=3)


# -- the steps ---------------------------------------------------------------------------------


async def connect(url: str) -> asyncpg.Connection:
    connection = await asyncpg.connect(url)
    await connection.execute(
        "SET synchronous_commit = off; SET maintenance_work_mem = '1GB'; SET work_mem = '512MB'"
    )
    return connection


async def tenants_and_keys(
    connection: asyncpg.Connection, shape: Shape, generated: Generated
) -> tuple[list[str], list[int]]:
    """Every tenant and its keys; (every key id in tenant order, each tenant's first's index)."""
    key_ids, first = [], []
    for n in range(1, shape.tenants + 1):
        tenant = shape.tenant(n)
        await create_tenant(connection, tenant)
        first.append(len(key_ids) + 1)
        for name in KEY_NAMES[: shape.keys_of(n)]:
            key_id, key = await create_key(connection, tenant, name)
            key_ids.append(key_id)
            if name == "prod":
                generated.keys[tenant] = key_id, key
    return key_ids, first


async def load_transactions(url: str, shape: Shape, args: tuple[object, ...]) -> None:
    """The transactions, in chunks, ``LOADERS`` backends at once, with a progress line."""
    chunks = [(lo, min(lo + CHUNK, shape.transactions))
              for lo in range(0, shape.transactions, CHUNK)]  # fmt: skip
    done, started, said = 0, time.perf_counter(), time.perf_counter()
    sql = transactions_sql()

    async def loader() -> None:
        nonlocal done, said
        connection = await connect(url)
        try:
            while chunks:
                lo, hi = chunks.pop(0)
                await connection.execute(sql, lo, hi, *args)
                done += hi - lo
                if time.perf_counter() - said > 10 or done == shape.transactions:
                    said = time.perf_counter()
                    elapsed = said - started
                    rate = done / elapsed
                    print(
                        f"    {done:,} of {shape.transactions:,} transactions,"
                        f" {elapsed:.0f} s ({rate:,.0f} rows/s)",
                        flush=True,
                    )
        finally:
            await connection.close()

    await asyncio.gather(*(loader() for _ in range(LOADERS)))


async def generate(url: str, shape: Shape) -> Generated:
    """Fill the migrated database at ``url`` (see the module docstring)."""
    generated = Generated()
    steps = Steps(generated)
    connection = await connect(url)
    try:
        key_ids, first = await steps.run(
            "tenants and keys", tenants_and_keys(connection, shape, generated)
        )
        await spend(connection, shape, steps, key_ids, first)
        await transactions(connection, url, shape, steps, key_ids, first)
        await steps.run("vacuum (analyze)", connection.execute("VACUUM (ANALYZE)"))
        await steps.run("invoices", invoice(connection, shape, generated))
    finally:
        await connection.close()
    return generated


async def spend(
    connection: asyncpg.Connection, shape: Shape, steps: Steps, key_ids: list[str], first: list[int]
) -> None:
    """The summary and the minutes, checked."""
    prices, shares = catalogue(), tenant_shares(shape)
    await steps.run(
        f"minutes: requests per tenant × minute ({shape.tenants * shape.days * 1440:,})",
        connection.execute(MINUTES_SQL, shares, shape.start, shape.end, Decimal(shape.requests)),
    )
    await connection.execute(DAYS_SQL)
    if shape.history_days:
        first_day = shape.start.date() - timedelta(days=shape.history_days)
        await connection.execute(
            HISTORY_SQL, shares, float(shape.rate), first_day, shape.start.date()
        )
    tenants = [shape.tenant(n) for n in range(1, shape.tenants + 1)]
    key_counts = [shape.keys_of(n) for n in range(1, shape.tenants + 1)]
    summary = connection.execute(
        summary_sql(), list(MODEL_SHARES), tenants, key_counts, list(PROMPT_MEAN),
        list(COMPLETION_MEAN), list(REASONING), prices["prompt"], prices["completion"],
        prices["cache_read"], prices["cache_write"], prices["cache_write_1h"],
        prices["web_search"], prices["model"], key_ids, first,
    )  # fmt: skip
    days = shape.days + 1 + shape.history_days
    await steps.run(f"summary: tenant × day ({days}) × model × key, tokens and costs", summary)
    await steps.run(
        "minutes: costs, into billing_spend_minutes",
        connection.execute(SPEND_MINUTES_SQL, tenants),
    )
    await connection.execute("DROP TABLE bench_minutes, bench_days")
    await check(connection, shape)


async def transactions(
    connection: asyncpg.Connection,
    url: str,
    shape: Shape,
    steps: Steps,
    key_ids: list[str],
    first: list[int],
) -> None:
    """The transactions, into UNLOGGED partitions without indexes; then the indexes."""
    prices, shares = catalogue(), tenant_shares(shape)
    await create_partitions(connection, month_range(month_of(shape.start), month_of(shape.end)))
    restore = await strip(connection, SimpleNamespace(partitioned=True))
    dense = min(shape.dense_seconds * shape.rate, shape.transactions)
    sparse = shape.transactions - dense
    dense_start = shape.end - timedelta(seconds=dense / shape.rate)
    step = (dense_start - shape.start).total_seconds() / max(sparse, 1)
    tenants = [shape.tenant(n) for n in range(1, shape.tenants + 1)]
    key_counts = [shape.keys_of(n) for n in range(1, shape.tenants + 1)]
    args = (
        sparse, shape.start, step, dense_start, float(shape.rate), cumulative(shares),
        tenants, cumulative(list(MODEL_SHARES)), prices["model"], list(PROMPT_MEAN),
        list(COMPLETION_MEAN), prices["prompt"], prices["cache_read"],
        prices["cache_write"], key_ids, first, key_counts, list(REASONING),
        prices["web_search"], prices["completion"],
    )  # fmt: skip
    await steps.run(
        f"transactions: {shape.transactions:,} rows", load_transactions(url, shape, args)
    )
    await steps.run("transactions: primary key and indexes", run_all(connection, restore))


async def run_all(connection: asyncpg.Connection, statements: list[str]) -> None:
    for statement in statements:
        await connection.execute(statement)


async def check(connection: asyncpg.Connection, shape: Shape) -> None:
    """The summary holds rate × window requests; every tenant-day's minutes equal its rows."""
    total = int(
        await connection.fetchval(
            "SELECT sum(requests) FROM tenant_billing_summary WHERE day >= $1", shape.start.date()
        )
    )
    if total != shape.requests:
        raise RuntimeError(f"the summary holds {total:,} requests, not {shape.requests:,}")
    if differing := await connection.fetchval(CHECK_SQL, shape.start.date()):
        raise RuntimeError(f"{differing} tenant-days' minutes differ from their summary rows")
    print(
        f"  checked: the window's summary rows hold {total:,} requests = {shape.rate:,}/s ×"
        f" {shape.days} days; every tenant-day's minutes add up to its summary rows (requests"
        " and cost, exactly)"
    )


async def invoice(connection: asyncpg.Connection, shape: Shape, generated: Generated) -> None:
    """Close the months of the summary that are over (one invoice per tenant and month)."""
    now = datetime.now(shape.end.tzinfo)
    first = shape.start - timedelta(days=shape.history_days)
    for month in month_range(month_of(first), month_of(shape.end)):
        if month_bounds(month)[1] <= now:
            report = await close_month(connection, month, now=now)
            generated.invoices += len(report.issued)
