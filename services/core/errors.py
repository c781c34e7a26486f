"""Errors raised by the pricing core.

    BillingError                 root of every error the core raises
    ├── UsageError               usage that cannot be priced (names the offending field)
    ├── PricingError             a pricing object that cannot be used (names the field)
    ├── QuoteRequestError        a quote request with a missing or malformed field
    └── PriceNotFound            no price for the model at the requested time
        └── VariablePricing      the model has no fixed price (routers, "-1")

Every error carries ``field`` (where applicable) so callers can report it to the client
verbatim; nothing in the core ever prices an invalid input as zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime


class BillingError(Exception):
    """Root of the core's exceptions."""


class UsageError(BillingError):
    """Usage that is malformed or does not add up; it must never be priced."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class PricingError(BillingError):
    """A pricing object with a missing, negative or non-numeric price."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"pricing.{field}: {reason}")
        self.field = field
        self.reason = reason


class QuoteRequestError(BillingError):
    """A quote request whose own fields (not its usage or pricing) are invalid."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class PriceNotFound(BillingError):
    """No price is known for the model (or none was in effect at the requested time)."""

    def __init__(
        self,
        model: str,
        at: datetime | None = None,
        suggestions: Sequence[str] = (),
        reason: str | None = None,
    ) -> None:
        if reason is None:
            reason = f"no price for model {model!r}"
            if at is not None:
                reason += f" in effect at {at.isoformat()}"
        super().__init__(reason)
        self.model = model
        self.at = at
        self.suggestions = list(suggestions)
        self.reason = reason


class VariablePricing(PriceNotFound):
    """The catalogue lists the model with a variable price (e.g. a router): not billable."""
