"""Reading invoice exports (both shapes), amounts and months, and the comparison."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from services.core.pricebook import InMemoryPriceBook
from services.core.provider_invoice import InvoiceError, parse_money, parse_when, read_invoice
from services.core.reconciliation import canonical_totals, compare, parse_month

NOV = parse_month("2026-11")


def read(text: str) -> dict[str, Decimal]:
    return read_invoice(io.StringIO(text, newline=""), *NOV).totals


@pytest.mark.parametrize(
    ("text", "amount"),
    [
        ("1.23", "1.23"),
        (" $1.23 ", "1.23"),
        ("-$1,234.56", "-1234.56"),
        ("$-1.5", "-1.5"),
        ("1,234,567", "1234567"),
        ("1.5e-05", "0.000015"),
        ("1.5E-05", "0.000015"),
        (".5", "0.5"),
        ("USD 3", "3"),
        ("3.10 usd", "3.10"),
        ("0.000000000000000000000000000001", "1E-30"),
        ("+2", "2"),
    ],
)
def test_amounts_are_exact_decimals(text: str, amount: str) -> None:
    parsed = parse_money(text)
    assert isinstance(parsed, Decimal)
    assert parsed == Decimal(amount)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1,5", "a comma only separates thousands"),
        ("1.234,56", "a comma only separates thousands"),
        ("12,34.5", "a comma only separates thousands"),
        ("(1.23)", "is not an amount"),
        ("abc", "is not an amount"),
        ("$", "is not an amount"),
        ("1.2.3", "is not an amount"),
        ("NaN", "is not an amount"),
        ("inf", "is not an amount"),
        ("1E+999999", "out of range"),
        ("0.0000000000000000000000000000001", "more than 30 decimal places"),
    ],
)
def test_bad_amounts_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(")):
        parse_money(text)


def test_months_are_utc_half_open() -> None:
    assert NOV == (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    assert parse_month("2026-12")[1] == datetime(2027, 1, 1, tzinfo=UTC)
    for bad in ("2026-13", "2026-00", "2026-1", "11-2026", "2026/11", "0000-01", "9999-12", ""):
        with pytest.raises(ValueError, match="--month must be YYYY-MM"):
            parse_month(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-03", datetime(2026, 11, 3, tzinfo=UTC)),
        ("2026-11-03 18:54:30.040", datetime(2026, 11, 3, 18, 54, 30, 40_000, tzinfo=UTC)),
        ("2026-11-03T18:54:30Z", datetime(2026, 11, 3, 18, 54, 30, tzinfo=UTC)),
        ("2026-11-01T01:00:00+02:00", datetime(2026, 10, 31, 23, tzinfo=UTC)),
        ("2026-11-03 00:00:00 UTC", datetime(2026, 11, 3, tzinfo=UTC)),
    ],
)
def test_times_default_to_utc(text: str, expected: datetime) -> None:
    assert parse_when(text) == expected


def test_simple_shape_one_row_per_model() -> None:
    totals = read("model,cost\nopenai/gpt-5,12.50\nanthropic/claude-sonnet-4.5,$3.25\n")
    assert totals == {
        "openai/gpt-5": Decimal("12.50"),
        "anthropic/claude-sonnet-4.5": Decimal("3.25"),
    }


@pytest.mark.parametrize("column", ["cost", "Total", "USAGE", "amount", " cost_total "])
def test_the_cost_column_goes_by_several_names(column: str) -> None:
    assert read(f"Model,{column}\nm/a,1\n") == {"m/a": Decimal(1)}


def test_simple_shape_per_day_and_model_is_summed_within_the_month() -> None:
    invoice = read_invoice(
        io.StringIO(
            "\ufeffday,model,amount\n"  # a BOM, as Excel writes it
            "2026-10-31,m/a,100\n"
            "2026-11-01,m/a,1.10\n"
            '2026-11-02,m/a,"1,000.05"\n'
            "2026-11-02,m/b,0.000000000000000000000000000001\n"
            "\n"
            "2026-11-30,m/b,2\n"
            "2026-12-01,m/b,100\n",
            newline="",
        ),
        *NOV,
    )
    assert invoice.totals == {
        "m/a": Decimal("1001.15"),
        "m/b": Decimal("2.000000000000000000000000000001"),  # exact beyond 28 digits
    }
    assert (invoice.rows, invoice.outside, invoice.byok_rows) == (4, 2, 0)
    assert invoice.layout.shape == "simple"


OPENROUTER_GENERATIONS = (
    "generation_id,created_at,cost_total,cost_web_search,cost_cache,cost_file_processing,"
    "byok_usage_inference,tokens_prompt,tokens_completion,tokens_reasoning,tokens_cached,"
    "model_permaslug,provider_name,finish_reason_normalized,generation_time_ms,"
    "time_to_first_token_ms\n"
    "gen-1,2026-11-03 18:54:30.040,0.0021,0,0,0,,1000,10,0,0,openai/gpt-5-2025-08-07,OpenAI,"
    "stop,800,200\n"
    "gen-2,2026-11-04 09:00:00.000,1.5e-05,0,0,0,0,10,1,0,0,openai/gpt-5-2025-08-07,OpenAI,"
    "stop,800,200\n"
    "gen-3,2026-11-05 10:00:00.000,0.00005,0,0,0,0.001,900,100,0,0,"
    "anthropic/claude-4.5-sonnet-20250929,Anthropic,stop,900,300\n"
    "gen-4,2026-10-31 23:59:59.999,9,0,0,0,,1,1,0,0,openai/gpt-5-2025-08-07,OpenAI,stop,1,1\n"
)


def test_openrouter_generation_export() -> None:
    invoice = read_invoice(io.StringIO(OPENROUTER_GENERATIONS, newline=""), *NOV)
    assert invoice.layout.shape == "openrouter"
    assert invoice.totals == {
        "openai/gpt-5-2025-08-07": Decimal("0.002115"),
        "anthropic/claude-4.5-sonnet-20250929": Decimal("0.001"),  # BYOK: inference, not fee
    }
    assert (invoice.rows, invoice.outside, invoice.byok_rows) == (3, 1, 1)
    assert "created_at" in invoice.layout.describe()


def test_openrouter_activity_rows_prefer_the_slug_over_the_permaslug() -> None:
    text = (
        "date,model,model_permaslug,endpoint_id,provider_name,usage,byok_usage_inference,"
        "requests,prompt_tokens,completion_tokens,reasoning_tokens\n"
        "2026-11-24,openai/gpt-4.1,openai/gpt-4.1-2025-04-14,ep1,OpenAI,0.015,0,5,50,125,25\n"
        "2026-11-25,openai/gpt-4.1,openai/gpt-4.1-2025-04-14,ep1,OpenAI,0.005,0,1,5,5,0\n"
    )
    assert read(text) == {"openai/gpt-4.1": Decimal("0.020")}


def test_permaslugs_resolve_to_our_model_ids(snapshot_book: InMemoryPriceBook) -> None:
    resolve = snapshot_book.resolve
    totals = {
        "openai/gpt-5-2025-08-07": Decimal("1"),
        "openai/gpt-5": Decimal("2"),
        "acme/unknown-1": Decimal("3"),
    }
    merged, unknown = canonical_totals(totals, resolve)
    assert merged == {"openai/gpt-5": Decimal(3), "acme/unknown-1": Decimal(3)}
    assert unknown == ["acme/unknown-1"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("model,price\nm,1\n", "line 1: the header (model, price) has no cost column"),
        ("name,cost\nm,1\n", "has no model column (model or model_permaslug)"),
        ("model,cost,Cost\nm,1,1\n", "line 1: column 'cost' appears twice"),
        ("model,cost\nm/a,1\nm/b,1,5\n", "line 3: 3 fields where the header has 2"),
        ('model,cost\nm/a,1\nm/b,"1,5"\n', "line 3, column 'cost': '1,5' is not an amount"),
        ("model,cost\n,1\n", "line 2, column 'model': no model"),
        ("date,model,cost\n03/11/2026,m,1\n", "line 2, column 'date': '03/11/2026' is not a date"),
        ('model,cost\nm,"1\n', "line 2: not valid CSV"),
    ],
)
def test_malformed_exports_name_the_line_and_column(text: str, message: str) -> None:
    with pytest.raises(InvoiceError) as caught:
        read(text)
    assert message in str(caught.value)


def test_compare_flags_models_beyond_the_tolerance_and_one_sided_ones() -> None:
    ours = {"a": Decimal("101"), "b": Decimal("103.0001"), "c": Decimal("5"), "z": Decimal(0)}
    theirs = {"a": Decimal("100"), "b": Decimal("100"), "d": Decimal("2"), "e": Decimal(0)}
    lines = {line.model: line for line in compare(ours, theirs, Decimal(1))}
    assert list(lines) == ["a", "b", "c", "d", "e", "z"]
    assert not lines["a"].off  # exactly 1% is within
    assert lines["a"].percent == Decimal(1)
    assert lines["b"].off and lines["b"].difference == Decimal("3.0001")
    assert lines["c"].off and lines["c"].status == "ONLY OURS OFF" and lines["c"].percent is None
    assert lines["d"].off and lines["d"].status == "ONLY THEIRS OFF"
    assert lines["d"].difference == Decimal(-2)
    assert not lines["e"].off and not lines["z"].off  # nothing on either side
    assert lines["a"].status == "ok" and lines["b"].status == "OFF"
