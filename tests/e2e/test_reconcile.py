"""``billing reconcile`` run as a subprocess against a database holding a month of usage."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from services.adapters.database import init_connection
from services.core.events import UsageCounts, UsagePriced, UsageRecorded
from services.core.pricebook import InMemoryPriceBook
from services.core.rating import rate
from services.core.usage import parse_usage
from services.projector.apply import apply_batch
from tests.e2e.test_cli import BILLING

pytestmark = pytest.mark.e2e

GPT, SONNET = "openai/gpt-5", "anthropic/claude-sonnet-4.5"
NOV = datetime(2026, 11, 1, tzinfo=UTC)


def priced(n: int, model: str, when: datetime, book: InMemoryPriceBook) -> UsagePriced:
    usage = parse_usage({"prompt_tokens": 200_000 + n, "completion_tokens": 20_000}).usage
    fact = UsageRecorded(
        request_id=f"req-{n}",
        tenant_id=f"tenant-{n % 2}",
        provider="openrouter",
        provider_model_id=model,
        occurred_at=when,
        recorded_at=when,
        usage=UsageCounts.of(usage),
    )
    return rate(fact, book, priced_at=when)


@pytest.fixture
async def month(database_url: str, snapshot_book: InMemoryPriceBook) -> dict[str, Decimal]:
    """30 requests a model spread over November 2026, a few in October and December;
    returns November's totals per model."""
    events = [
        priced(n, GPT if n % 2 else SONNET, NOV + timedelta(hours=23 * n), snapshot_book)
        for n in range(60)
    ]
    events += [
        priced(100, GPT, NOV - timedelta(seconds=1), snapshot_book),
        priced(101, SONNET, datetime(2026, 12, 1, tzinfo=UTC), snapshot_book),
    ]
    connection = await asyncpg.connect(database_url)
    await init_connection(connection)
    try:
        await apply_batch(connection, "projector", events, {})
    finally:
        await connection.close()
    totals: dict[str, Decimal] = {}
    for e in events:
        if NOV <= e.occurred_at < datetime(2026, 12, 1, tzinfo=UTC):
            totals[e.model] = totals.get(e.model, Decimal(0)) + e.total_cost
    return totals


def reconcile(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BILLING_DATABASE_URL": database_url}
    return subprocess.run(
        [BILLING, "reconcile", *args], env=env, capture_output=True, text=True, timeout=60
    )


def write_simple(path: Path, gpt: Decimal, sonnet: Decimal) -> Path:
    """Per day and model, GPT under its OpenRouter permaslug, one row of October."""
    half = (gpt / 2).quantize(Decimal("0.000001"))
    path.write_text(
        "date,model,cost\n"
        f"2026-10-31,{GPT},$1000.00\n"
        f"2026-11-02,openai/gpt-5-2025-08-07,{half}\n"
        f"2026-11-17,{GPT},${gpt - half}\n"
        f'2026-11-30,{SONNET},"${sonnet:,.6f}"\n'
    )
    return path


def line_of(output: str, model: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(model + " "))


def test_a_model_3_percent_off_fails_and_is_named(
    month: dict[str, Decimal], database_url: str, tmp_path: Path
) -> None:
    theirs_gpt = (month[GPT] * Decimal("1.005")).quantize(Decimal("0.000001"))  # ours -0.5%
    theirs_sonnet = (month[SONNET] / Decimal("1.03")).quantize(Decimal("0.000001"))  # ours +3%
    invoice = write_simple(tmp_path / "invoice.csv", theirs_gpt, theirs_sonnet)

    result = reconcile(database_url, "--month", "2026-11", "--invoice", str(invoice))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert line_of(out, SONNET).endswith("OFF")
    assert "+3.00%" in line_of(out, SONNET)
    assert line_of(out, GPT).endswith("ok") and "-0.50%" in line_of(out, GPT)
    assert f"{month[SONNET].quantize(Decimal('0.000001'))}" in line_of(out, SONNET)
    assert "1 row(s) outside 2026-11 ignored" in out
    assert f"1 model(s) off by more than 1%: {SONNET}" in out
    assert "only in" not in out  # the permaslug matched our model

    # A wider tolerance lets the same invoice pass.
    args = ("--month", "2026-11", "--invoice", str(invoice), "--tolerance-pct", "3.5")
    assert reconcile(database_url, *args).returncode == 0


def test_the_same_invoice_with_the_model_fixed_passes(
    month: dict[str, Decimal], database_url: str, tmp_path: Path
) -> None:
    theirs_gpt = (month[GPT] * Decimal("1.005")).quantize(Decimal("0.000001"))
    invoice = write_simple(tmp_path / "invoice.csv", theirs_gpt, month[SONNET])
    result = reconcile(database_url, "--month", "2026-11", "--invoice", str(invoice))
    assert result.returncode == 0, result.stdout + result.stderr
    assert line_of(result.stdout, SONNET).endswith("ok")
    assert "every model within 1%" in result.stdout


def test_an_openrouter_generation_export_and_one_sided_models(
    month: dict[str, Decimal], database_url: str, tmp_path: Path
) -> None:
    invoice = tmp_path / "openrouter.csv"
    invoice.write_text(
        "generation_id,created_at,cost_total,byok_usage_inference,tokens_prompt,"
        "tokens_completion,model_permaslug,provider_name\n"
        f"gen-1,2026-11-03 18:54:30.040,{month[GPT]},,1,1,openai/gpt-5-2025-08-07,OpenAI\n"
        "gen-2,2026-11-04 01:00:00.000,0.25,,1,1,acme/mystery-1,Acme\n"
    )
    result = reconcile(database_url, "--month", "2026-11", "--invoice", str(invoice))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "openrouter:" in out
    assert line_of(out, GPT).endswith("ok")
    assert line_of(out, SONNET).endswith("ONLY OURS OFF")
    assert line_of(out, "acme/mystery-1").endswith("ONLY THEIRS OFF")
    assert f"only in ours: {SONNET}" in out and "only in the invoice: acme/mystery-1" in out
    assert "does not know (matched as written): acme/mystery-1" in out

    # tenant-1 holds every GPT request and no Sonnet one.
    args = ("--month", "2026-11", "--invoice", str(invoice), "--tenant", "tenant-1")
    one = reconcile(database_url, *args)
    assert one.returncode == 1 and "tenant tenant-1" in one.stdout
    assert line_of(one.stdout, GPT).endswith("ok")
    assert SONNET not in one.stdout


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ("model,cost\nopenai/gpt-5,1,5\n", (), "line 2: 3 fields where the header has 2"),
        ('model,cost\nopenai/gpt-5,"1,5"\n', (), "line 2, column 'cost': '1,5' is not an"),
        ("model,price\nopenai/gpt-5,1\n", (), "has no cost column"),
        ("date,model,cost\n11/03/2026,m,1\n", (), "line 2, column 'date'"),
        ("", (), "the file is empty"),
        ("model,cost\nm,1\n", ("--month", "2026-13"), "--month must be YYYY-MM"),
        ("model,cost\nm,1\n", ("--tolerance-pct", "lots"), "--tolerance-pct"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    database_url: str, tmp_path: Path, content: str, args: tuple[str, ...], message: str
) -> None:
    invoice = tmp_path / "bad.csv"
    invoice.write_text(content)
    result = reconcile(database_url, "--month", "2026-11", "--invoice", str(invoice), *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_files_and_no_database_exit_2(database_url: str, tmp_path: Path) -> None:
    missing = reconcile(database_url, "--month", "2026-11", "--invoice", str(tmp_path / "x.csv"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    binary = tmp_path / "export.xlsx"
    binary.write_bytes(b"PK\x03\x04\xff\xfe\x00garbage")
    result = reconcile(database_url, "--month", "2026-11", "--invoice", str(binary))
    assert result.returncode == 2 and "not UTF-8 text" in result.stderr
    fine = tmp_path / "fine.csv"
    fine.write_text("model,cost\nm,1\n")
    env = {k: v for k, v in os.environ.items() if k != "BILLING_DATABASE_URL"}
    nodb = subprocess.run(
        [BILLING, "reconcile", "--month", "2026-11", "--invoice", str(fine)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert nodb.returncode == 2 and "BILLING_DATABASE_URL" in nodb.stderr
