"""Re-rating a window (pure): next revisions, the diff report, and exact money in both."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.core.corrections import record_correction
from services.core.errors import PriceNotFound
from services.core.events import UsageCounts, UsageRecorded
from services.core.pricebook import InMemoryPriceBook
from services.core.pricing import parse_pricing
from services.core.rating import rate
from services.core.rerating import (
    Current,
    Line,
    Report,
    Window,
    cost_moved,
    model_of,
    rerate,
    rerate_all,
)
from services.core.usage import Usage

MODEL = "acme/model-1"
T0 = datetime(2026, 10, 1, tzinfo=UTC)
OCCURRED = T0 + timedelta(days=3)
NOW = T0 + timedelta(days=30)
USAGE = Usage(prompt_tokens=1000, uncached_input_tokens=1000, completion_tokens=100)


@pytest.fixture
def book() -> InMemoryPriceBook:
    book = InMemoryPriceBook()
    book.record(
        MODEL, parse_pricing({"prompt": "0.000001", "completion": "0.000002"}), effective_from=T0
    )
    return book


def fact(request_id: str = "r1", model: str = MODEL, tenant: str = "t1") -> UsageRecorded:
    return UsageRecorded(
        request_id=request_id,
        tenant_id=tenant,
        provider="openrouter",
        provider_model_id=model,
        occurred_at=OCCURRED,
        recorded_at=OCCURRED,
        usage=UsageCounts.of(USAGE),
    )


def billed(book: InMemoryPriceBook, recorded: UsageRecorded) -> Current:
    """What the projector holds after the first pricing of ``recorded``."""
    return Current(1, rate(recorded, book, priced_at=OCCURRED).total_cost)


def raise_prompt_price(book: InMemoryPriceBook, prompt: str) -> None:
    record_correction(
        book,
        MODEL,
        {"prompt": Decimal(prompt)},
        effective_from=T0,
        reason="the catalogue was wrong",
        by="test",
    )


def test_a_raised_price_gives_revision_2_with_the_exact_delta(book: InMemoryPriceBook) -> None:
    recorded = fact()
    current = billed(book, recorded)
    assert current.total_cost == Decimal("0.0012")  # 1,000 × $1/M + 100 × $2/M
    raise_prompt_price(book, "0.0000030000000000000000000001")

    priced = rerate(recorded, current, book, NOW, "correction")

    assert priced is not None
    new = Decimal("0.0032000000000000000000001")  # 1,000 × the new prompt price + 0.0002
    assert (priced.revision, priced.total_cost) == (2, new)
    assert priced.previous_total_cost == Decimal("0.0012")
    assert priced.delta_cost == Decimal("0.0020000000000000000000001")
    assert (priced.reason, priced.priced_at) == ("correction", NOW)


def test_an_unchanged_price_produces_nothing(book: InMemoryPriceBook) -> None:
    recorded = fact()
    current = billed(book, recorded)
    report = Report("run")

    assert rerate(recorded, current, book, NOW, "again") is None
    assert rerate_all([(recorded, current)], book, NOW, "again", report) == []
    assert not cost_moved(book, MODEL, USAGE, OCCURRED, current.total_cost)
    assert (report.changed, report.unpriced, report.lines) == (0, 0, {})
    assert report.to_json()["delta"] == "0"


def test_an_unknown_model_is_counted_unpriced_and_left_alone(book: InMemoryPriceBook) -> None:
    unknown = fact("r2", model="nobody/unknown")
    current = Current(1, Decimal("0.5"))
    report = Report("run")

    with pytest.raises(PriceNotFound):
        rerate(unknown, current, book, NOW, "correction")
    with pytest.raises(PriceNotFound):
        cost_moved(book, "nobody/unknown", USAGE, OCCURRED, current.total_cost)
    assert rerate_all([(unknown, current)], book, NOW, "correction", report) == []
    assert (report.unpriced, report.changed) == (1, 0)
    assert model_of(book, unknown) is None


def test_rerate_all_reports_per_tenant_and_model(book: InMemoryPriceBook) -> None:
    pairs = [(f, billed(book, f)) for f in (fact("a", tenant="t1"), fact("b", tenant="t2"))]
    pairs.append((fact("c", tenant="t1"), billed(book, fact("c"))))
    raise_prompt_price(book, "0.000002")
    report = Report("run")

    revised = rerate_all(pairs, book, NOW, "correction", report)

    assert [p.request_id for p in revised] == ["a", "b", "c"]
    assert all(p.revision == 2 and p.delta_cost == Decimal("0.001") for p in revised)
    assert report.changed == 3
    assert report.rows() == [
        {
            "tenant_id": "t1",
            "model": MODEL,
            "requests_changed": 2,
            "old_total": "0.0024",
            "new_total": "0.0044",
            "delta": "0.002",
        },
        {
            "tenant_id": "t2",
            "model": MODEL,
            "requests_changed": 1,
            "old_total": "0.0012",
            "new_total": "0.0022",
            "delta": "0.001",
        },
    ]
    assert report.to_json()["delta"] == "0.003"


def test_line_delta_is_exact_beyond_28_digits() -> None:
    # The default context keeps 28 significant digits: new − old would round here.
    assert Line(1, Decimal(0), Decimal("1.000000000000000000000000000007")).delta == Decimal(
        "1.000000000000000000000000000007"
    )
    assert Line(1, Decimal(1), Decimal("1.000000000000000000000000000007")).delta == Decimal(
        "0.000000000000000000000000000007"
    )
    wide = Line(1, Decimal("0.000000000000000000000000000001"), Decimal("10"))
    assert wide.delta == Decimal("9.999999999999999999999999999999")


def test_report_totals_are_exact_sums() -> None:
    report = Report("run")
    report.add("t1", "m1", Decimal(0), Decimal("2.000000000000000000000000000001"))
    report.add("t1", "m1", Decimal("0.000000000000000000000000000001"), Decimal(0))
    report.add("t2", "m2", Decimal("0.000000000000000000000000000003"), Decimal(5))

    assert report.lines[("t1", "m1")].old_total == Decimal("1E-30")
    # Each line's delta, as the diff prints it, is exact too (it used to round to 28 digits).
    assert [row["delta"] for row in report.rows()] == ["2", "4.999999999999999999999999999997"]
    exact = Decimal("6.999999999999999999999999999997")  # 2.000…001 − 0.000…001 + 4.999…997
    assert report.to_json()["delta"] == "6.999999999999999999999999999997"
    assert report.delta == exact


def test_the_report_renders_as_json_or_csv() -> None:
    report = Report("run", scanned=4, emitted=1)
    report.add("t1", MODEL, Decimal("0.1"), Decimal("0.3"))

    whole = json.loads(report.render(".JSON"))
    assert whole["run_id"] == "run" and whole["scanned"] == 4 and whole["delta"] == "0.2"
    diff = list(csv.DictReader(io.StringIO(report.render(".csv"))))
    assert diff == [
        {
            "tenant_id": "t1",
            "model": MODEL,
            "requests_changed": "1",
            "old_total": "0.1",
            "new_total": "0.3",
            "delta": "0.2",
        }
    ]


def test_the_window_holds_facts_by_time_tenant_and_model() -> None:
    window = Window(T0, T0 + timedelta(days=7), MODEL, "t1")
    assert window.holds(fact(), MODEL)
    assert not window.holds(fact(tenant="t2"), MODEL)
    assert not window.holds(fact(), "acme/other")
    assert not window.holds(fact(), None)
    assert not Window(T0, OCCURRED).holds(fact(), MODEL)  # until is exclusive
    with pytest.raises(ValueError, match="--since must be before --until"):
        Window(OCCURRED, OCCURRED)
