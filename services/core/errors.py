"""Errors raised by the pricing core.

    BillingError                 root of every error the core raises
    ├── FieldError               bad input; ``field`` names where
    │   ├── UsageError           usage that cannot be priced
    │   ├── PricingError         a pricing object that cannot be used
    │   └── QuoteRequestError    a quote request with a missing or malformed field
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


class FieldError(BillingError):
    """Input that cannot be used; ``field`` is its path, ``reason`` says why."""

    prefix = ""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{self.prefix}{field}: {reason}")
        self.field = field
        self.reason = reason


class UsageError(FieldError):
    """Usage that is malformed or does not add up; it must never be priced."""


class PricingError(FieldError):
    """A pricing object with a missing, negative or non-numeric price (``field`` is its key)."""

    prefix = "pricing."


class QuoteRequestError(FieldError):
    """A quote request whose own fields (not its usage or pricing) are invalid."""


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
