"""The events: immutable facts, versioned JSON on the wire, money as decimal strings.

``UsageRecorded`` (topic ``billing.usage.v1``): a request happened and used this much.
``UsagePriced`` (topic ``billing.costs.v1``): that usage costs this much under this price
version; a re-rating is a newer ``UsagePriced`` with a higher ``revision`` whose
``delta_cost`` is the change, so a consumer keeps running totals by summing deltas and
deduplicating on (``request_id``, ``revision``).

Both are keyed by ``tenant_id``. An event is never mutated: a correction is a newer event.
Old versions are brought forward by :func:`upcast` before validation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from services.core.cost import CostBreakdown
from services.core.errors import UsageError
from services.core.money import fmt, to_decimal
from services.core.usage import ReportedCost, Usage, check_usage


def _money(value: object) -> Decimal:
    if isinstance(value, Decimal | int | str):
        return to_decimal(value)
    raise ValueError("money must be a decimal string")  # floats included: never on the wire


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamps must carry a timezone (RFC 3339)")
    return value.astimezone(UTC)


Money = Annotated[
    Decimal,
    BeforeValidator(_money),
    PlainSerializer(fmt, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": r"^-?\d+(\.\d+)?$", "description": "USD"}),
]
"""A USD amount: ``Decimal`` in Python, a plain decimal string on the wire."""


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")  # PostgreSQL cannot store them
    return value


Timestamp = Annotated[datetime, AfterValidator(_utc)]
Count = Annotated[int, Field(ge=0, lt=10**12, strict=True)]
Identifier = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_no_nul)]
MetadataKey = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_no_nul)]
MetadataValue = Annotated[str, Field(max_length=2048), AfterValidator(_no_nul)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=64)]
"""Free-form string → string, bounded (64 keys, 128/2,048 characters) so an event stays far
below the broker's message size limit."""


class _Fact(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UsageCounts(_Fact):
    """The normalised usage (see ``services.core.usage.Usage``)."""

    prompt_tokens: Count = 0
    uncached_input_tokens: Count = 0
    cache_read_tokens: Count = 0
    cache_write_tokens: Count = 0
    cache_write_1h_tokens: Count = 0
    completion_tokens: Count = 0
    reasoning_tokens: Count = 0
    web_search_requests: Count = 0
    images: Count = 0
    requests: Count = 1

    @model_validator(mode="after")
    def _adds_up(self) -> UsageCounts:
        try:
            check_usage(self.to_usage())
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        return self

    @classmethod
    def of(cls, usage: Usage) -> UsageCounts:
        """From a parsed (already checked) usage, without validating again."""
        return cls.model_construct(**usage.as_dict())  # type: ignore[arg-type]

    def to_usage(self) -> Usage:
        return Usage(**self.model_dump())


class ReportedCharge(_Fact):
    """What the upstream said it charged (OpenRouter ``usage.cost`` etc.)."""

    cost: Money | None = None
    upstream_inference_cost: Money | None = None
    is_byok: bool = False

    @classmethod
    def of(cls, reported: ReportedCost | None) -> ReportedCharge | None:
        if reported is None:
            return None
        return cls(
            cost=reported.cost,
            upstream_inference_cost=reported.upstream_inference_cost,
            is_byok=reported.is_byok,
        )


class Breakdown(_Fact):
    prompt_cost: Money
    cache_read_cost: Money
    cache_write_cost: Money
    completion_cost: Money
    internal_reasoning_cost: Money
    request_cost: Money
    web_search_cost: Money
    image_cost: Money
    total_cost: Money

    @classmethod
    def of(cls, b: CostBreakdown) -> Breakdown:
        return cls.model_construct(
            prompt_cost=b.prompt_cost,
            cache_read_cost=b.cache_read_cost,
            cache_write_cost=b.cache_write_cost,
            completion_cost=b.completion_cost,
            internal_reasoning_cost=b.internal_reasoning_cost,
            request_cost=b.request_cost,
            web_search_cost=b.web_search_cost,
            image_cost=b.image_cost,
            total_cost=b.total_cost,
        )


class UsageRecorded(_Fact):
    """A billable request happened (one per ``request_id``, however often it is delivered)."""

    event_type: Literal["UsageRecorded"] = "UsageRecorded"
    schema_version: Literal[1] = 1
    request_id: Identifier
    tenant_id: Identifier
    api_key_id: Identifier | None = None
    provider: Identifier
    provider_model_id: Identifier
    occurred_at: Timestamp
    recorded_at: Timestamp
    usage: UsageCounts
    usage_source: Literal["upstream", "estimated"] = "upstream"
    usage_format: str = Field(default="normalised", max_length=32)
    reported: ReportedCharge | None = None
    metadata: Metadata = Field(default_factory=dict)


class UsagePriced(_Fact):
    """What a recorded request costs under one price version (a newer revision corrects it)."""

    event_type: Literal["UsagePriced"] = "UsagePriced"
    schema_version: Literal[1] = 1
    request_id: Identifier
    tenant_id: Identifier
    api_key_id: Identifier | None = None
    provider: Identifier
    provider_model_id: Identifier
    model: Identifier
    """The price book's canonical id for ``provider_model_id``."""
    occurred_at: Timestamp
    recorded_at: Timestamp
    usage: UsageCounts
    usage_source: Literal["upstream", "estimated"]
    reported: ReportedCharge | None = None
    metadata: Metadata = Field(default_factory=dict)
    breakdown: Breakdown
    total_cost: Money
    currency: Literal["USD"] = "USD"
    price_version: int
    pricing_tier: dict[str, int] | None = None
    revision: int = Field(ge=1)
    priced_at: Timestamp
    previous_total_cost: Money
    delta_cost: Money
    reason: Annotated[str, Field(max_length=1000), AfterValidator(_no_nul)] = "priced"
    """Why this revision exists: "priced" for the first, else the correction's reason."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where a message sits in the log (offsets, dead letters)."""

    topic: str
    partition: int
    offset: int


def _decode(model: type[_E], value: bytes) -> _E:
    """Decode an event of any schema version; raises ``ValueError`` (or ``ValidationError``).

    The current version is parsed straight from bytes by pydantic-core (money stays text
    until it becomes a ``Decimal``); an older one goes through the upcasters first.
    """
    if not isinstance(value, bytes | bytearray | str):
        raise ValueError("the message has no value (a tombstone?)")
    try:
        return model.model_validate_json(value)
    except ValidationError:
        document = json.loads(value, parse_float=Decimal)
        if not isinstance(document, dict):
            raise ValueError("an event must be a JSON object") from None
        version = document.get("schema_version")
        if not isinstance(version, int) or not isinstance(document.get("event_type"), str):
            raise  # no usable version to upcast from: report pydantic's own error
        if version == model.model_fields["schema_version"].default:
            raise  # current version and still invalid
        return model.model_validate(upcast(document))


def decode_recorded(value: bytes) -> UsageRecorded:
    """Decode a ``billing.usage.v1`` message."""
    return _decode(UsageRecorded, value)


def decode_priced(value: bytes) -> UsagePriced:
    """Decode a ``billing.costs.v1`` message."""
    return _decode(UsagePriced, value)


_E = TypeVar("_E", UsageRecorded, UsagePriced)

EVENT_TYPES: Final[dict[str, type[BaseModel]]] = {
    "UsageRecorded": UsageRecorded,
    "UsagePriced": UsagePriced,
}

# One function per schema change, keyed by (event type, version it upgrades *from*).
UPCASTERS: Final[dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]]] = {}


def upcast(document: dict[str, Any]) -> dict[str, Any]:
    """Bring an event document of any past version up to the current one."""
    kind = document.get("event_type")
    version = document.get("schema_version", 1)
    while (kind, version) in UPCASTERS:
        document = UPCASTERS[(str(kind), int(version))](document)
        version = document["schema_version"]
    return document
