"""Prepaid credit grants: what makes one valid (issue #11).

A grant adds ``amount`` USD to a tenant's balance, for a stated ``reason``, optionally until
``expires_at``. ``grant_of`` checks a grant as the CLI and the HTTP API receive it; the
ledger (``adapters/credits.py``) records it once per idempotency key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation

from services.core.errors import FieldError, QuoteRequestError
from services.core.quote import parse_time

MAX_AMOUNT = Decimal("1000000000")
"""A single grant or budget is below this (USD): a typo guard, far above any real top-up, and
the bound of the money an event carries (``core.money``)."""
PLACES = 9
"""Money is exact to 1e-9 USD in this project; a grant finer than that is refused."""


class CreditError(FieldError):
    """A grant with a missing or invalid field."""


@dataclass(frozen=True, slots=True)
class Grant:
    tenant_id: str
    amount: Decimal
    reason: str
    idempotency_key: str | None = None
    expires_at: datetime | None = None


def grant_of(
    tenant_id: object,
    amount: object,
    reason: object,
    idempotency_key: object = None,
    expires_at: object = None,
    *,
    now: datetime,
) -> Grant:
    """A valid grant from the caller's values, or :class:`CreditError` naming the field."""
    if not isinstance(tenant_id, str) or not tenant_id:
        raise CreditError("tenant_id", "is required")
    return Grant(
        tenant_id,
        _amount(amount),
        _text(reason, "reason", required=True, limit=500) or "",
        _text(idempotency_key, "idempotency_key", required=False, limit=200),
        _expiry(expires_at, now),
    )


def _amount(value: object) -> Decimal:
    return usd(value, "amount", CreditError, example="25.00", most="in one grant")


def usd(
    value: object,
    field: str,
    error: type[FieldError],
    *,
    example: str,
    zero: bool = False,
    most: str = "",
) -> Decimal:
    """An amount of USD given by a client: a decimal string (a JSON integer or a Decimal too,
    never a float), finite, positive (or zero with ``zero``), below :data:`MAX_AMOUNT` (the
    largest amount an event carries),
    exact to :data:`PLACES` places; else ``error(field, why)``."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise error(field, f'must be a decimal string such as "{example}"')
    try:
        amount = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise error(field, f"{value!r} is not a decimal number") from None
    if not amount.is_finite() or amount < 0 or (amount == 0 and not zero):
        raise error(field, f"must be {'zero or ' if zero else ''}a positive number of USD")
    if amount >= MAX_AMOUNT:
        raise error(field, f"must be below {MAX_AMOUNT} USD{' ' + most if most else ''}")
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -PLACES:
        raise error(field, f"has more than {PLACES} decimal places")
    return amount


def _text(value: object, field: str, *, required: bool, limit: int) -> str | None:
    if value is None or value == "":
        if required:
            raise CreditError(field, "is required")
        return None
    if not isinstance(value, str) or not value.strip():
        raise CreditError(field, "must be a non-empty string")
    if len(value) > limit:
        raise CreditError(field, f"must be at most {limit} characters")
    if "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise CreditError(field, "must not contain NUL or unpaired surrogates")
    return value.strip()


def _expiry(value: object, now: datetime) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        expires_at = value if isinstance(value, datetime) else parse_time(value, "expires_at")
    except QuoteRequestError as exc:
        raise CreditError("expires_at", exc.reason) from None
    if expires_at.tzinfo is None:
        raise CreditError("expires_at", "has no timezone (add Z or +00:00)")
    if expires_at <= now:
        raise CreditError("expires_at", "must be in the future")
    return expires_at
