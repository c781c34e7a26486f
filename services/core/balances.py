"""What a tenant sees of its balance and budgets (issue #11): the numbers, composed.

The APIs and the CLI read a tenant's ledger sums, its budgets, this month's spend and what
the gateways' live leases hold (``adapters.quota``); :func:`balance_view` turns them into
one answer, the same for ``GET /v1/billing/balance`` and ``billing balance``. Money is
exact (``core.money``) and printed as plain decimal strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date
from decimal import Decimal
from typing import Any, Protocol

from services.core import money
from services.core.money import fmt
from services.core.quota import Budget, balance_scope, budget_scope, period_label

CURRENCY = "USD"


class Sums(Protocol):
    """A tenant's ledger, summed (``adapters.quota.Ledger``)."""

    @property
    def granted(self) -> Decimal: ...
    @property
    def expired(self) -> Decimal: ...
    @property
    def charged(self) -> Decimal: ...


class Holding(Protocol):
    """What the live leases hold in one scope (``adapters.quota.Held``)."""

    @property
    def reserved(self) -> Decimal: ...
    @property
    def pending(self) -> Decimal: ...


def lease_scopes(tenant_id: str, key_id: str, period: date) -> list[str]:
    """The scopes whose leases :func:`balance_view` needs: the tenant's balance, its budget
    in ``period`` and (when a key asks) the key's budget in ``period``."""
    scopes = [balance_scope(tenant_id).key, budget_scope(tenant_id, "", period).key]
    if key_id:
        scopes.append(budget_scope(tenant_id, key_id, period).key)
    return scopes


def balance_view(
    tenant_id: str,
    *,
    ledger: Sums,
    prepaid: bool,
    period: date,
    budgets: Iterable[Budget],
    spent: Mapping[str, Decimal],
    held: Mapping[str, Holding],
    key_id: str = "",
) -> dict[str, Any]:
    """The balance answer: ``{currency, prepaid, balance, reserved, pending, available, budget,
    key_budget}`` (``prepaid``: whether the balance limits the tenant's requests).

    ``balance`` is grants − expired − charged, exactly. ``reserved`` and ``pending`` are
    what live leases hold against the tenant's balance when it is ``prepaid``, else against
    its own budget of ``period`` (0 when neither is leased), and ``available`` is
    ``balance − reserved − pending`` — computed the same way for a postpaid tenant (no
    grants), whose balance is then minus what it has spent: nothing refuses its requests
    for it, but the figure stays comparable. ``budget`` is the tenant's own budget
    (``api_key_id`` '') in ``period``, ``key_budget`` that of ``key_id``; each ``None``
    when there is none. ``spent`` maps api_key_id ('' for the tenant) to its spend in
    ``period``, ``held`` scope keys (:func:`lease_scopes`) to their leases.
    """
    balance = _less(ledger.granted, ledger.expired, ledger.charged)
    scope = balance_scope(tenant_id) if prepaid else budget_scope(tenant_id, "", period)
    reserved, pending = _held(held, scope.key)
    by_key = {b.api_key_id: b for b in budgets if b.tenant_id == tenant_id}
    return {
        "currency": CURRENCY,
        "prepaid": prepaid,
        "balance": fmt(balance),
        "reserved": fmt(reserved),
        "pending": fmt(pending),
        "available": fmt(_less(balance, reserved, pending)),
        "budget": _budget_view(by_key.get(""), period, spent, held),
        "key_budget": _budget_view(by_key.get(key_id), period, spent, held) if key_id else None,
    }


def _less(amount: Decimal, *less: Decimal) -> Decimal:
    """``amount`` minus each of ``less``, exactly (unary minus would round to 28 digits)."""
    for other in less:
        amount = money.difference(amount, other)
    return amount


def _held(held: Mapping[str, Holding], scope_key: str) -> tuple[Decimal, Decimal]:
    holding = held.get(scope_key)
    if holding is None:
        return money.ZERO, money.ZERO
    return holding.reserved, holding.pending


def _budget_view(
    budget: Budget | None,
    period: date,
    spent: Mapping[str, Decimal],
    held: Mapping[str, Holding],
) -> dict[str, Any] | None:
    """``{period, limit, spent, remaining, hard}``; ``remaining`` is the limit less the spend
    and what leases hold in the budget's scope (below zero once a soft budget is overrun)."""
    if budget is None:
        return None
    used = spent.get(budget.api_key_id, money.ZERO)
    scope = budget_scope(budget.tenant_id, budget.api_key_id, period)
    reserved, pending = _held(held, scope.key)
    return {
        "period": period_label(period),
        "limit": fmt(budget.monthly_limit),
        "spent": fmt(used),
        "remaining": fmt(_less(budget.monthly_limit, used, reserved, pending)),
        "hard": budget.hard,
    }


def budget_json(budget: Budget) -> dict[str, Any]:
    """A budget as the budgets API answers it: the limit spelled as stored (``"100.00"``),
    ``api_key_id`` ``None`` for the tenant's own budget."""
    return {
        "tenant_id": budget.tenant_id,
        "api_key_id": budget.api_key_id or None,
        "monthly_limit": format(budget.monthly_limit, "f"),
        "hard": budget.hard,
        "alerts": list(budget.alerts),
    }
