"""What makes a credit grant valid (``core/credits.grant_of``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.core.credits import CreditError, grant_of

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def test_a_grant_keeps_its_amount_exact() -> None:
    grant = grant_of("acme", " 25.000000001 ", " top-up ", "k-1", "2027-01-01T00:00:00Z", now=NOW)
    assert grant.amount == Decimal("25.000000001") and grant.reason == "top-up"
    assert grant.idempotency_key == "k-1"
    assert grant.expires_at == datetime(2027, 1, 1, tzinfo=UTC)
    assert grant_of("acme", 5, "promo", now=NOW).amount == Decimal(5)
    assert grant_of("acme", Decimal("0.5"), "promo", "", "", now=NOW).expires_at is None


@pytest.mark.parametrize(
    ("amount", "says"),
    [
        ("0", "positive"),
        ("-1", "positive"),
        ("NaN", "positive"),
        ("Infinity", "positive"),
        ("abc", "not a decimal"),
        (0.1, "decimal string"),  # a float is never money here
        (True, "decimal string"),
        (None, "decimal string"),
        ("0.0000000001", "decimal places"),
        ("1000000000", "below"),
    ],
)
def test_a_bad_amount_is_refused_naming_the_field(amount: object, says: str) -> None:
    with pytest.raises(CreditError) as refused:
        grant_of("acme", amount, "top-up", now=NOW)
    assert refused.value.field == "amount" and says in refused.value.reason


@pytest.mark.parametrize(
    ("field", "values", "says"),
    [
        ("tenant_id", {"tenant_id": ""}, "required"),
        ("reason", {"reason": None}, "required"),
        ("reason", {"reason": "   "}, "non-empty"),
        ("reason", {"reason": "a\x00b"}, "NUL"),
        ("reason", {"reason": "x" * 501}, "at most 500"),
        ("idempotency_key", {"idempotency_key": 7}, "non-empty string"),
        ("idempotency_key", {"idempotency_key": "\ud800"}, "surrogates"),
        ("expires_at", {"expires_at": "2026-12-01T00:00:00Z"}, "future"),
        ("expires_at", {"expires_at": "2027-01-01T00:00:00"}, "timezone"),
        ("expires_at", {"expires_at": "soon"}, "RFC 3339"),
    ],
)
def test_other_bad_fields_are_refused_by_name(
    field: str, values: dict[str, object], says: str
) -> None:
    given: dict[str, object] = {"tenant_id": "acme", "amount": "1", "reason": "top-up"} | values
    with pytest.raises(
        CreditError if field != "expires_at" or "future" in says else Exception
    ) as refused:
        grant_of(
            given["tenant_id"],
            given["amount"],
            given["reason"],
            given.get("idempotency_key"),
            given.get("expires_at"),
            now=NOW,
        )
    assert refused.value.field == field and says in refused.value.reason


def test_an_expiry_a_moment_ahead_is_taken() -> None:
    soon = NOW + timedelta(seconds=1)
    assert grant_of("acme", "1", "promo", expires_at=soon, now=NOW).expires_at == soon
