"""core.invoices: the lines always add up to the amount due, the subtotal is exact."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.invoices import Usage, build_invoice, invoice_number

D = Decimal
AMOUNT = st.decimals(min_value=-1000, max_value=100_000, places=15, allow_nan=False)
NOV = date(2026, 11, 1)


def test_the_number_names_the_issuer_the_month_and_a_six_digit_count() -> None:
    assert invoice_number("INV", NOV, 42) == "INV-2026-11-000042"


@settings(max_examples=300)
@given(
    usage=st.lists(st.tuples(st.sampled_from("abcdef"), AMOUNT), max_size=6),
    changes=st.lists(AMOUNT, max_size=3),
    credits=st.decimals(min_value=0, max_value=10_000, places=9, allow_nan=False),
)
def test_lines_add_up_to_the_amount_due_and_the_subtotal_is_exact(
    usage: list[tuple[str, Decimal]], changes: list[Decimal], credits: Decimal
) -> None:
    models = dict(usage)  # one line per model
    invoice = build_invoice(
        number="INV-2026-11-000001",
        tenant_id="acme",
        period=NOV,
        issued_at=datetime(2026, 12, 4, tzinfo=UTC),
        usage=[Usage(m, 1, {}, a) for m, a in models.items()],
        adjustments=[(date(2026, 10, 1), f"m{i}", a) for i, a in enumerate(changes)],
        credits=(credits, D(0)),
    )
    exact = sum(models.values(), D(0)) + sum(changes, D(0))
    assert invoice.subtotal == exact
    assert invoice.credits_applied == min(max(exact, D(0)), credits)
    assert invoice.amount_due == (exact - invoice.credits_applied).quantize(D("0.01"))
    assert sum((line.amount for line in invoice.lines), D(0)) == invoice.amount_due
    for line in invoice.lines:
        if line.kind != "rounding":
            assert line.amount == line.exact_amount.quantize(D("1e-9"))
    document = invoice.document()
    assert sum(D(line["amount"]) for line in document["lines"]) == D(document["amount_due"])


def test_half_even_to_the_cent() -> None:
    invoice = build_invoice(
        number="n",
        tenant_id="acme",
        period=NOV,
        issued_at=datetime(2026, 12, 4, tzinfo=UTC),
        usage=[Usage("m", 3, {}, D("0.125"))],
        adjustments=[],
        credits=(D(0), D(0)),
    )
    assert invoice.amount_due == D("0.12") and invoice.document()["amount_due"] == "0.12"
    assert [line.kind for line in invoice.lines] == ["usage", "rounding"]
    assert invoice.lines[1].amount == D("-0.005")


def test_a_refund_returns_the_prepaid_credit_that_paid_for_it_before_anything_is_owed() -> None:
    def invoice(change: str, available: str, applied: str) -> tuple[Decimal, Decimal]:
        built = build_invoice(
            number="n",
            tenant_id="acme",
            period=NOV,
            issued_at=datetime(2026, 12, 4, tzinfo=UTC),
            usage=[],
            adjustments=[(date(2026, 10, 1), "m", D(change))],
            credits=(D(available), D(applied)),
        )
        assert sum((line.amount for line in built.lines), D(0)) == built.amount_due
        return built.credits_applied, built.amount_due

    # October (100, paid with credit) re-rated to 40: the 60 goes back to the credit.
    assert invoice("-60", "0", "100") == (D(-60), D("0.00"))
    # Only 25 of credit was ever applied: 25 goes back, 35 is owed to the tenant.
    assert invoice("-60", "0", "25") == (D(-25), D("-35.00"))
    assert invoice("-60", "0", "0") == (D(0), D("-60.00"))  # postpaid: a credit note
