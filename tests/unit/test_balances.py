"""The balance answer composed from ledger sums, budgets, spend and leases (core.balances)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from services.core.balances import balance_view, budget_json, lease_scopes
from services.core.quota import Budget

D = Decimal
JUNE = date(2025, 6, 1)


@dataclass(frozen=True)
class Sums:
    granted: Decimal = D(0)
    expired: Decimal = D(0)
    charged: Decimal = D(0)


@dataclass(frozen=True)
class Held:
    reserved: Decimal = D(0)
    pending: Decimal = D(0)


def test_scopes_read_are_the_balance_and_the_months_budgets() -> None:
    assert lease_scopes("acme", "", JUNE) == ["balance/acme", "budget/acme//2025-06"]
    assert lease_scopes("acme", "k1", JUNE)[-1] == "budget/acme/k1/2025-06"


def test_a_prepaid_tenant_sees_its_balance_less_what_its_leases_hold() -> None:
    view = balance_view(
        "acme",
        ledger=Sums(D("100.00"), D("10"), D("12.345000001")),
        prepaid=True,
        period=JUNE,
        budgets=[Budget("acme", "", D("50.00"), True, (50,)), Budget("acme", "k1", D("5"))],
        spent={"": D("12.345000001"), "k1": D("1.5")},
        held={
            "balance/acme": Held(D("0.25"), D("0.05")),
            "budget/acme//2025-06": Held(D("0.2"), D("0.01")),
            "budget/acme/k1/2025-06": Held(D("0.1"), D("0")),
        },
        key_id="k1",
    )
    assert view == {
        "currency": "USD",
        "prepaid": True,
        "balance": "77.654999999",
        "reserved": "0.25",
        "pending": "0.05",
        "available": "77.354999999",
        "budget": {
            "period": "2025-06",
            "limit": "50",
            "spent": "12.345000001",
            "remaining": "37.444999999",
            "hard": True,
        },
        "key_budget": {
            "period": "2025-06",
            "limit": "5",
            "spent": "1.5",
            "remaining": "3.4",
            "hard": True,
        },
    }


def test_a_postpaid_tenant_counts_what_its_budget_leases_hold() -> None:
    view = balance_view(
        "acme",
        ledger=Sums(charged=D("3")),
        prepaid=False,
        period=JUNE,
        budgets=[Budget("acme", "", D("10"), hard=False)],
        spent={"": D("3")},
        held={"balance/acme": Held(D("9")), "budget/acme//2025-06": Held(D("1"), D("0.5"))},
    )
    assert (view["balance"], view["reserved"], view["pending"], view["available"]) == (
        "-3",
        "1",
        "0.5",
        "-4.5",
    )
    assert view["budget"] == {
        "period": "2025-06",
        "limit": "10",
        "spent": "3",
        "remaining": "5.5",
        "hard": False,
    }
    assert view["key_budget"] is None


def test_nothing_held_and_no_budget_is_zero_and_null() -> None:
    view = balance_view(
        "acme", ledger=Sums(), prepaid=False, period=JUNE, budgets=[], spent={}, held={}
    )
    assert view == {
        "currency": "USD",
        "prepaid": False,
        "balance": "0",
        "reserved": "0",
        "pending": "0",
        "available": "0",
        "budget": None,
        "key_budget": None,
    }


def test_a_key_without_its_own_budget_sees_only_the_tenants() -> None:
    view = balance_view(
        "acme",
        ledger=Sums(D("1")),
        prepaid=True,
        period=JUNE,
        budgets=[Budget("acme", "", D("2")), Budget("acme", "other", D("1"))],
        spent={},
        held={},
        key_id="mine",
    )
    assert view["budget"] is not None and view["key_budget"] is None


def test_an_overrun_soft_budget_has_negative_headroom() -> None:
    view = balance_view(
        "acme",
        ledger=Sums(),
        prepaid=False,
        period=JUNE,
        budgets=[Budget("acme", "", D("1.00"), hard=False)],
        spent={"": D("1.75")},
        held={},
    )
    assert view["budget"]["remaining"] == "-0.75"


def test_amounts_beyond_28_digits_stay_exact() -> None:
    fine = D("0.000000000000000000000000000001")  # 1e-30: what a token may cost
    view = balance_view(
        "acme",
        ledger=Sums(granted=D("100000000"), charged=fine),
        prepaid=True,
        period=JUNE,
        budgets=[],
        spent={},
        held={"balance/acme": Held(reserved=fine)},
    )
    assert view["balance"] == "99999999.999999999999999999999999999999"
    assert view["available"] == "99999999.999999999999999999999999999998"


def test_a_budget_answers_its_limit_as_stored() -> None:
    assert budget_json(Budget("acme", "", D("100.00"))) == {
        "tenant_id": "acme",
        "api_key_id": None,
        "monthly_limit": "100.00",
        "hard": True,
        "alerts": [50, 80, 100],
    }
    key = budget_json(Budget("acme", "k1", D("1E-7"), hard=False, alerts=()))
    assert (key["api_key_id"], key["monthly_limit"], key["hard"], key["alerts"]) == (
        "k1",
        "0.0000001",
        False,
        [],
    )
