"""What the pricer does with a batch, free of Kafka: decode, rate, sort into outcomes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from services.core.errors import BillingError, PriceNotFound, PricingError
from services.core.events import (
    Position,
    UsagePriced,
    UsageRecorded,
    decode_recorded,
    undecodable_reason,
)
from services.core.pricebook import PriceLookup
from services.core.rating import rate


@dataclass(frozen=True, slots=True)
class Incoming:
    key: bytes | None
    value: bytes
    position: Position


@dataclass(slots=True)
class Outcome:
    priced: list[UsagePriced] = field(default_factory=list)
    unpriced: list[tuple[UsageRecorded, str]] = field(default_factory=list)
    """Recorded usage with no price yet, and why: held back, never billed at $0."""
    dead: list[tuple[Incoming, str]] = field(default_factory=list)
    """Messages that cannot be decoded, and why: for the dead-letter topic."""


def price_batch(batch: Sequence[Incoming], book: PriceLookup, *, now: datetime) -> Outcome:
    outcome = Outcome()
    for message in batch:
        try:
            recorded = decode_recorded(message.value)
        except Exception as exc:  # decoding is pure: whatever it raises, the message is bad
            outcome.dead.append((message, _reason(exc)))
            continue
        try:
            outcome.priced.append(rate(recorded, book, priced_at=now))
        except PriceNotFound as exc:
            outcome.unpriced.append((recorded, exc.reason))
        except (PricingError, ArithmeticError) as exc:
            # The price is at fault (a bad book entry): held like a missing price, priced
            # again once the price is corrected, never dead-lettered and so never lost.
            outcome.unpriced.append((recorded, f"price unusable: {type(exc).__name__}"))
        except BillingError as exc:
            # Decoded but usage the rules refuse: one bad message must not stop the
            # partition, and is never billed at $0.
            outcome.dead.append((message, f"cannot be priced: {type(exc).__name__}: {exc}"[:500]))
    return outcome


def _reason(exc: Exception) -> str:
    return undecodable_reason(exc, "UsageRecorded")
