"""Balances, budgets and admission: the rules, without any I/O (issue #11).

A tenant's **balance** is its grants, less what expired unused, less every ``delta_cost``
of its requests (counted once per (``request_id``, ``revision``)). A **budget** caps what a
tenant, or one of its API keys, spends in a UTC calendar month: *hard* ones refuse
requests, *soft* ones only alert. A request is admitted against every **scope** that
limits it — the tenant's balance when it is prepaid, each hard budget that covers its key —
and reserves its worst-case cost in each (:func:`worst_case_cost`).

Gateways hold **leases**: a slice of a scope's headroom, reserved against in memory. The
headroom a lease may take is what the scope allows (:func:`lease_free`), so the sum of all
leases never exceeds the scope's cap — the bound the no-bypass guarantee rests on.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, localcontext
from typing import Literal

from services.core.credits import usd
from services.core.errors import FieldError
from services.core.money import EXACT
from services.core.pricing import ModelPricing

ZERO = Decimal(0)
DEFAULT_ALERTS = (50, 80, 100)
"""Budget alert thresholds, in percent of the monthly limit."""
PROMPT_MARGIN = Decimal("1.25")
PROMPT_SLACK = 16
"""A reservation counts ``ceil(prompt × PROMPT_MARGIN) + PROMPT_SLACK`` prompt tokens: the
local tokenizer is close to, not exactly, what an upstream bills (chat templates, another
tokenizer for the model family)."""

AlertKind = Literal["BudgetThresholdCrossed", "BalanceLow", "BalanceExhausted"]


class BudgetError(FieldError):
    """A budget with a missing or invalid field."""


@dataclass(frozen=True, slots=True)
class Budget:
    tenant_id: str
    api_key_id: str
    """'' for the whole tenant."""
    monthly_limit: Decimal
    hard: bool = True
    alerts: tuple[int, ...] = DEFAULT_ALERTS


def budget_of(
    tenant_id: object,
    monthly_limit: object,
    *,
    api_key_id: object = "",
    hard: object = True,
    alerts: object = None,
) -> Budget:
    """A valid budget from the caller's values, or :class:`BudgetError` naming the field."""
    if not isinstance(tenant_id, str) or not tenant_id:
        raise BudgetError("tenant_id", "is required")
    if api_key_id is None:
        api_key_id = ""
    if not isinstance(api_key_id, str) or len(api_key_id) > 256 or "\x00" in api_key_id:
        raise BudgetError("key_id", "must be an API key id")
    if not isinstance(hard, bool):
        raise BudgetError("hard", "must be true or false")
    return Budget(tenant_id, api_key_id, _limit(monthly_limit), hard, alerts_of(alerts))


def _limit(value: object) -> Decimal:
    return usd(value, "monthly_limit", BudgetError, example="100.00", zero=True)


def alerts_of(value: object) -> tuple[int, ...]:
    """Alert thresholds from ``"50,80,100"`` or ``[50, 80, 100]`` (None: the default);
    each a whole percent from 1 to 1000, sorted, without repeats; ``""``/``[]``: none."""
    if value is None:
        return DEFAULT_ALERTS
    if isinstance(value, str):
        parts: Sequence[object] = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, list | tuple):
        parts = value
    else:
        raise BudgetError("alerts", "must be a list of percentages such as [50, 80, 100]")
    thresholds = set()
    for part in parts:
        number = part
        if isinstance(part, str) and part.isascii() and part.isdigit():
            number = int(part)
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 1000:
            raise BudgetError("alerts", f"{part!r} is not a whole percentage from 1 to 1000")
        thresholds.add(number)
    return tuple(sorted(thresholds))


# -- scopes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scope:
    """What a reservation is held against: a tenant's balance, or one budget in one month."""

    kind: Literal["balance", "budget"]
    tenant_id: str
    api_key_id: str = ""
    """The budget's key ('' for the tenant's budget, and for the balance)."""
    period: date | None = None
    """The budget's month (``None`` for the balance)."""

    @property
    def key(self) -> str:
        """``balance/T`` or ``budget/T/KEY/YYYY-MM``: the lease rows' ``scope``."""
        if self.period is None:
            return f"balance/{self.tenant_id}"
        return f"budget/{self.tenant_id}/{self.api_key_id}/{self.period:%Y-%m}"


def balance_scope(tenant_id: str) -> Scope:
    return Scope("balance", tenant_id)


def budget_scope(tenant_id: str, api_key_id: str, period: date) -> Scope:
    """The scope of a budget in one month (``api_key_id`` '' for the tenant's budget)."""
    return Scope("budget", tenant_id, api_key_id, period)


def period_label(period: date) -> str:
    return f"{period:%Y-%m}"


# -- what a request may cost -------------------------------------------------------------------


def reserved_prompt_tokens(counted: int) -> int:
    """The prompt tokens a reservation assumes for ``counted`` local tokens."""
    return math.ceil(counted * PROMPT_MARGIN) + PROMPT_SLACK


def worst_case_cost(
    pricing: ModelPricing, prompt_tokens: int, completion_tokens: int, at: datetime
) -> Decimal:
    """The most ``prompt_tokens`` in and ``completion_tokens`` out can cost under ``pricing``.

    Every prompt token at the dearest input price (uncached, cache write, 1-hour cache
    write: an upstream may bill any of them), every completion token at the dearest output
    price (reasoning is inside completion, priced apart only by ``internal_reasoning``), the
    per-request fee, and the tier the prompt size selects. Web searches and images are not
    counted: a request asks for neither by its token limits.
    """
    prices = pricing
    if pricing.tiers:
        prices, _ = pricing.for_request(prompt_tokens, at)
    write = prices.input_cache_write if prices.input_cache_write is not None else prices.prompt
    inputs = [prices.prompt, write]
    if prices.input_cache_write_1h is not None:
        inputs.append(prices.input_cache_write_1h)
    if prices.input_cache_read is not None:
        inputs.append(prices.input_cache_read)
    outputs = [prices.completion]
    if prices.internal_reasoning is not None:
        outputs.append(prices.internal_reasoning)
    with localcontext(EXACT):
        return (
            prompt_tokens * max(inputs)
            + completion_tokens * max(outputs)
            + (prices.request or ZERO)
        )


# -- leases ------------------------------------------------------------------------------------


LEASE_HORIZON = 10
"""Refresh intervals of a process's own traffic one refill takes (when there is room)."""


def lease_free(*, need: Decimal, recent: Decimal, available: Decimal) -> Decimal:
    """How much free headroom a gateway asks for in one refill.

    ``need`` is what the requests waiting for it must reserve, ``recent`` what this process
    reserves in the scope per refresh interval (smoothed), ``available`` the scope's headroom
    not held by any lease. It takes enough for :data:`LEASE_HORIZON` intervals of its own
    traffic (at least 8 requests' worth), but never more than half of what is left unless
    the request needs it (so another gateway is not starved), and never more than there is.
    """
    if available <= 0:
        return ZERO
    want = max(need, recent * LEASE_HORIZON, need * 8)
    share = max(need, available / 2)
    return min(want, share, available)


# -- alerts ------------------------------------------------------------------------------------


def thresholds_reached(spent: Decimal, limit: Decimal, thresholds: Iterable[int]) -> list[int]:
    """The thresholds (percent of ``limit``) that ``spent`` has reached; none before any spend."""
    if spent <= 0:
        return []
    with localcontext(EXACT):
        return [t for t in thresholds if spent * 100 >= limit * t]


def balance_alerts(balance: Decimal, granted: Decimal, low_fraction: Decimal) -> list[AlertKind]:
    """``BalanceExhausted`` at or below zero, ``BalanceLow`` at or below ``low_fraction`` of
    what was granted (a tenant without grants gets neither)."""
    if granted <= 0:
        return []
    kinds: list[AlertKind] = []
    with localcontext(EXACT):
        if balance <= granted * low_fraction:
            kinds.append("BalanceLow")
    if balance <= 0:
        kinds.append("BalanceExhausted")
    return kinds


def budget_alert_id(tenant_id: str, api_key_id: str, period: date, threshold: int) -> str:
    """One per threshold per budget per month: the alert's idempotency key."""
    return f"budget/{tenant_id}/{api_key_id}/{period:%Y-%m}/{threshold}"


def balance_alert_id(tenant_id: str, kind: AlertKind, last_grant_id: int) -> str:
    """One per kind per top-up: a new grant re-arms the balance alerts."""
    return f"{kind}/{tenant_id}/after-grant-{last_grant_id}"


# -- expiry ------------------------------------------------------------------------------------


def expired_remainder(balance: Decimal, amount: Decimal, later: Decimal) -> Decimal:
    """What is left of an expiring grant of ``amount`` when the balance is ``balance``.

    Spending draws on the grant that expires first, so the grants that expire later (or
    never), worth ``later`` in all, are untouched while this one lasts: what remains of it
    is the balance beyond them, between zero and its amount.
    """
    with localcontext(EXACT):
        return min(amount, max(ZERO, balance - later))


# -- webhooks ----------------------------------------------------------------------------------

SIGNATURE_HEADER = "X-Billing-Signature"


def webhook_signature(secret: str, timestamp: int, body: bytes) -> str:
    """``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>`` under ``secret``.

    A receiver recomputes the HMAC over the timestamp and the raw body it received,
    compares in constant time, and refuses timestamps far from its clock (replays).
    """
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"
