"""``billing up --demo``: a realistic burst through the running pipeline, then the summary.

Three tenants, five models, every wire format, cached and reasoning tokens, and one request
in ten sent twice — the totals printed at the end must count each request once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import click
import httpx

from services.core.catalogue import apply_catalogue, default_catalogue
from services.core.money import difference, fmt, total
from services.core.pricebook import InMemoryPriceBook
from services.core.quote import quote

TENANTS = ("acme", "globex", "initech")
MODELS = (
    ("anthropic/claude-sonnet-4.5", "anthropic"),
    ("anthropic/claude-haiku-4.5", "openai"),
    ("openai/gpt-5", "openai_responses"),
    ("openai/gpt-5-mini", "openai"),
    ("google/gemini-2.5-flash", "gemini"),
)


def _usage(rng: random.Random, fmt: str) -> dict[str, Any]:
    prompt = rng.randint(200, 30_000)
    cached = rng.randint(0, prompt // 2) if rng.random() < 0.6 else 0
    out = rng.randint(20, 2_000)
    think = rng.randint(0, out // 2) if rng.random() < 0.5 else 0
    if fmt == "anthropic":
        write = rng.randint(0, (prompt - cached) // 3) if rng.random() < 0.3 else 0
        return {
            "input_tokens": prompt - cached - write,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": write,
            "output_tokens": out,
        }
    if fmt == "gemini":
        return {
            "promptTokenCount": prompt,
            "cachedContentTokenCount": cached,
            "candidatesTokenCount": out - think,
            "thoughtsTokenCount": think,
            "totalTokenCount": prompt + out,
        }
    if fmt == "openai_responses":
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": think},
            "total_tokens": prompt + out,
        }
    return {
        "prompt_tokens": prompt,
        "completion_tokens": out,
        "total_tokens": prompt + out,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": think},
    }


def burst(count: int = 300, seed: int = 2026) -> list[dict[str, Any]]:
    rng = random.Random(seed)  # noqa: S311 - demo data, not secrets
    start = datetime.now(UTC) - timedelta(hours=2)
    items = []
    for n in range(count):
        model, fmt = MODELS[n % len(MODELS)]
        items.append(
            {
                "request_id": f"demo-{seed:x}-{n:05d}",
                "tenant_id": TENANTS[rng.randrange(len(TENANTS))],
                "api_key_id": f"key-{rng.randrange(4)}",
                "provider": "openrouter",
                "provider_model_id": model,
                "format": fmt,
                "occurred_at": (start + timedelta(seconds=n * 7)).isoformat(),
                "usage": _usage(rng, fmt),
            }
        )
    return items


def run_demo(
    url: str,
    admin_token: str | None,
    echo: Any = click.echo,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Send the burst and print what it added to each tenant's bill (earlier runs on the
    same data directory are left out: totals are read before and after)."""
    items = burst(seed=time.time_ns() // 1000)  # request ids unique to this run
    duplicates = items[::10]
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    sent = items + duplicates
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        before = _totals(client)
        for start in range(0, len(sent), 100):
            response = client.post("/v1/usage", json=sent[start : start + 100])
            response.raise_for_status()
        echo(f"\ndemo        sent {len(sent)} usage records ({len(duplicates)} of them twice)")
        expected = _expected(items)
        after = _wait_for_totals(client, before, len(items), should_stop)
    _print_table(before, after, expected, echo)


def _expected(items: list[dict[str, Any]]) -> dict[str, Decimal]:
    """What each tenant should be billed, priced here by the core with the same prices."""
    book = InMemoryPriceBook()
    apply_catalogue(book, default_catalogue(), observed_at=datetime.now(UTC), source="snapshot")
    totals: dict[str, Decimal] = dict.fromkeys(TENANTS, Decimal(0))
    for item in items:
        answer = quote(item, book)
        cost = Decimal(answer["breakdown"]["total_cost"])
        totals[item["tenant_id"]] = total((totals[item["tenant_id"]], cost))
    return totals


def _totals(client: httpx.Client) -> dict[str, dict[str, Any]]:
    out = {}
    for tenant in TENANTS:
        response = client.get("/internal/billing/summary", params={"tenant_id": tenant})
        response.raise_for_status()
        out[tenant] = response.json()["totals"]
    return out


def _added(before: dict[str, Any], after: dict[str, Any], key: str) -> Any:
    if key.endswith("_cost"):
        return difference(Decimal(after[key]), Decimal(before[key]))
    return int(after[key]) - int(before[key])


def _wait_for_totals(
    client: httpx.Client,
    before: dict[str, dict[str, Any]],
    requests: int,
    should_stop: Callable[[], bool],
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + 120
    with click.progressbar(length=requests, label="projected  ") as bar:
        done = 0
        while True:
            after = _totals(client)
            now_done = sum(_added(before[t], after[t], "requests") for t in TENANTS)
            bar.update(now_done - done)
            done = now_done
            if done >= requests or time.monotonic() > deadline or should_stop():
                return after
            time.sleep(0.3)


def _print_table(
    before: dict[str, Any], after: dict[str, Any], expected: dict[str, Decimal], echo: Any
) -> None:
    echo("")
    echo(
        f"{'tenant':<10} {'requests':>8} {'prompt':>10} {'cached':>10} {'output':>9} "
        f"{'reasoning':>9} {'billed USD':>12} {'expected USD':>13}"
    )
    exact = True
    for tenant in TENANTS:
        b, a = before[tenant], after[tenant]
        billed = _added(b, a, "total_cost")
        exact = exact and billed == expected[tenant]
        echo(
            f"{tenant:<10} {_added(b, a, 'requests'):>8} {_added(b, a, 'prompt_tokens'):>10} "
            f"{_added(b, a, 'cache_read_tokens'):>10} {_added(b, a, 'completion_tokens'):>9} "
            f"{_added(b, a, 'reasoning_tokens'):>9} {fmt(billed):>12} {fmt(expected[tenant]):>13}"
        )
    echo("\nbilled == expected for every tenant" if exact else "\nMISMATCH: see above")


def dashboard_key(database_url: str, tenant: str = TENANTS[0]) -> str:
    """A new API key of a demo tenant, named ``dashboard``, to sign in to the dashboard."""
    import asyncio

    import asyncpg

    from services.adapters.tenants import create_key

    async def create() -> str:
        connection = await asyncpg.connect(database_url)
        try:
            return (await create_key(connection, tenant, "dashboard"))[1]
        finally:
            await connection.close()

    return asyncio.run(create())


def print_dashboard(url: str, database_url: str, admin_token: str | None, echo: Any) -> None:
    """Where the dashboard is and how to sign in to it."""
    key = dashboard_key(database_url)
    echo(f"\ndashboard   {url}/dashboard")
    echo(f"            sign in as tenant {TENANTS[0]} with the API key {key}")
    if admin_token:
        echo("            or with BILLING_ADMIN_TOKEN for the operator view (every tenant)")
    else:
        echo("            (set BILLING_ADMIN_TOKEN before `billing up` for the operator view)")
