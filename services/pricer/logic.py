"""What the pricer does with a batch, free of Kafka: decode, rate, sort into outcomes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import ValidationError

from services.core.errors import PriceNotFound
from services.core.events import Position, UsagePriced, UsageRecorded, decode_recorded
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
    return outcome


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "event"
        return f"invalid UsageRecorded: {where}: {first['msg']}"
    return f"undecodable: {exc}"[:500]
