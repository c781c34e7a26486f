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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    model_validator,
    with_config,
)
from typing_extensions import TypedDict

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


class QuotaAlert(_Fact):
    """A budget threshold crossed, or a prepaid balance low or exhausted (topic
    ``billing.alerts.v1``, key ``tenant_id``). Each is emitted once: ``alert_id`` names the
    threshold and period (or the top-up) it is about, for consumers to deduplicate on."""

    event_type: Literal["BudgetThresholdCrossed", "BalanceLow", "BalanceExhausted"]
    schema_version: Literal[1] = 1
    alert_id: Identifier
    tenant_id: Identifier
    api_key_id: Identifier | None = None
    """The key whose budget it is (``None``: the tenant's budget, or its balance)."""
    period: Annotated[str, Field(pattern=r"^\d{4}-\d{2}$")] | None = None
    """The budget's month (``YYYY-MM``, UTC); ``None`` for balance alerts."""
    threshold_percent: Annotated[int, Field(ge=1, le=1000)] | None = None
    limit: Money | None = None
    spent: Money | None = None
    hard: bool | None = None
    balance: Money | None = None
    granted: Money | None = None
    """Everything granted to the tenant (balance alerts)."""
    occurred_at: Timestamp


class InvoiceIssued(_Fact):
    """A tenant's invoice for a closed month was issued (topic ``billing.invoices.v1``, key
    ``tenant_id``); the invoice itself never changes afterwards. Published at least once:
    deduplicate on ``number``."""

    event_type: Literal["InvoiceIssued"] = "InvoiceIssued"
    schema_version: Literal[1] = 1
    number: Identifier
    tenant_id: Identifier
    period: Annotated[str, Field(pattern=r"^\d{4}-\d{2}$")]
    issued_at: Timestamp
    currency: Literal["USD"] = "USD"
    subtotal: Money
    credits_applied: Money
    amount_due: Money


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
    event = _decode(UsageRecorded, value)
    if "\x00" in event.usage_format:  # held usage goes into jsonb, which refuses NUL
        raise ValueError("usage_format must not contain NUL characters")
    _in_era(event.occurred_at, event.recorded_at)
    return event


def decode_priced(value: bytes) -> UsagePriced:
    """Decode a ``billing.costs.v1`` message."""
    if isinstance(value, bytes | bytearray | str) and (event := _decode_priced_plain(value)):
        return _storable(event)
    return _storable(_decode(UsagePriced, value))


_INT4: Final = 2**31
_INT8: Final = 2**63


def _storable(event: UsagePriced) -> UsagePriced:
    """``event`` if its numbers fit the read models and can be billed; else ``ValueError``.

    The model bounds what a valid event can be; this bounds what a consumer can store
    (``revision`` is an ``integer`` column, ``price_version`` a ``bigint``, a month's
    partition needs a representable next month) and what it may bill: a cost is never
    negative. Checked on decoding, so such a message goes to the dead-letter topic
    instead of failing its batch's transaction over and over.
    """
    _in_era(event.occurred_at, event.recorded_at, event.priced_at)
    if not 1 <= event.revision < _INT4:
        raise ValueError("revision is out of range (1 to 2^31-1)")
    if not 0 <= event.price_version < _INT8:
        raise ValueError("price_version is out of range (0 to 2^63-1)")
    if event.pricing_tier and any(not -_INT8 <= v < _INT8 for v in event.pricing_tier.values()):
        raise ValueError("pricing_tier holds an integer out of range")
    if event.total_cost < 0 or event.previous_total_cost < 0:
        raise ValueError("total_cost and previous_total_cost must not be negative")
    return event


_ERA: Final = (datetime(1970, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC))


def _in_era(*instants: datetime) -> None:
    """Timestamps far outside any billing period (year 1, year 9999) are refused: their
    month's partition and period arithmetic would overflow ``date``."""
    if any(not _ERA[0] <= instant < _ERA[1] for instant in instants):
        raise ValueError("a timestamp is outside 1970-01-01 to 9000-01-01")


def undecodable_reason(exc: BaseException, kind: str) -> str:
    """Why a message of ``kind`` did not decode, for a dead letter's ``reason`` header.

    Names the field and the rule, never the offending value (pydantic's own text repeats
    the input, which could be anything a producer sent), and is bounded in size.
    """
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        first = errors[0]
        # A location may hold a key of the message (metadata's): only field names are kept.
        where = ".".join(p if p in _FIELD_NAMES else "*" for p in map(str, first["loc"]))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"invalid {kind}: {where or 'event'}: {first['msg'][:200]}{more}"
    return f"undecodable {kind}: {type(exc).__name__}: {str(exc)[:200]}"


# -- the plain path ------------------------------------------------------------------------------
# The projector decodes every UsagePriced of the log, and pydantic calling the model's Python
# validators (per money field, timestamp, identifier, and the usage check) is most of that
# work. Events as this pipeline writes them (every field present, money as plain decimal
# strings) are validated by _PlainPriced, a schema pydantic-core checks natively, then built
# without validating again. It accepts a strict subset of what the model accepts: anything
# else (an older version, unusual but valid spellings, invalid input) takes the full decode,
# which raises for invalid input. A test holds the two paths equal.

_PLAIN_MONEY = r"^-?\d{1,9}(\.\d{0,30})?$"  # what money.to_decimal takes by its spelling alone
_NO_NUL = r"^[^\x00]*$"
_Plain = Annotated[str, StringConstraints(pattern=_PLAIN_MONEY)]
_Id = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=_NO_NUL)]
_Int = Annotated[int, Field(strict=True)]
_STRICT = ConfigDict(extra="forbid")


@with_config(_STRICT)
class _PlainCounts(TypedDict):
    prompt_tokens: Count
    uncached_input_tokens: Count
    cache_read_tokens: Count
    cache_write_tokens: Count
    cache_write_1h_tokens: Count
    completion_tokens: Count
    reasoning_tokens: Count
    web_search_requests: Count
    images: Count
    requests: Count


@with_config(_STRICT)
class _PlainCharge(TypedDict):
    cost: _Plain | None
    upstream_inference_cost: _Plain | None
    is_byok: Annotated[bool, Field(strict=True)]


@with_config(_STRICT)
class _PlainBreakdown(TypedDict):
    prompt_cost: _Plain
    cache_read_cost: _Plain
    cache_write_cost: _Plain
    completion_cost: _Plain
    internal_reasoning_cost: _Plain
    request_cost: _Plain
    web_search_cost: _Plain
    image_cost: _Plain
    total_cost: _Plain


@with_config(_STRICT)
class _PlainPriced(TypedDict):
    event_type: Literal["UsagePriced"]
    schema_version: Literal[1]
    request_id: _Id
    tenant_id: _Id
    api_key_id: _Id | None
    provider: _Id
    provider_model_id: _Id
    model: _Id
    occurred_at: AwareDatetime
    recorded_at: AwareDatetime
    usage: _PlainCounts
    usage_source: Literal["upstream", "estimated"]
    reported: _PlainCharge | None
    metadata: Annotated[
        dict[
            Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=_NO_NUL)],
            Annotated[str, StringConstraints(max_length=2048, pattern=_NO_NUL)],
        ],
        Field(max_length=64),
    ]
    breakdown: _PlainBreakdown
    total_cost: _Plain
    currency: Literal["USD"]
    price_version: _Int
    pricing_tier: dict[str, _Int] | None
    revision: Annotated[int, Field(ge=1, strict=True)]
    priced_at: AwareDatetime
    previous_total_cost: _Plain
    delta_cost: _Plain
    reason: Annotated[str, StringConstraints(max_length=1000, pattern=_NO_NUL)]


_PLAIN_PRICED: Final = TypeAdapter(_PlainPriced)
_new = object.__new__
_set = object.__setattr__


def _built(model: type[_F], fields: Mapping[str, Any]) -> _F:
    """``model`` holding ``fields`` (already checked), as ``model_validate`` would build it."""
    built = _new(model)
    _set(built, "__dict__", fields)
    _set(built, "__pydantic_fields_set__", set(fields))
    _set(built, "__pydantic_extra__", None)
    _set(built, "__pydantic_private__", None)
    return built


def _decode_priced_plain(value: bytes) -> UsagePriced | None:
    """The event, if ``value`` is a current-version UsagePriced in the plain spelling."""
    try:
        doc: dict[str, Any] = _PLAIN_PRICED.validate_json(value)  # type: ignore[assignment]
    except ValidationError:
        return None
    counts = doc["usage"]
    try:
        check_usage(Usage(**counts))
    except UsageError:
        return None
    doc["usage"] = _built(UsageCounts, counts)
    doc["breakdown"] = _built(
        Breakdown, {name: Decimal(text) for name, text in doc["breakdown"].items()}
    )
    if (reported := doc["reported"]) is not None:
        for name in ("cost", "upstream_inference_cost"):
            if reported[name] is not None:
                reported[name] = Decimal(reported[name])
        doc["reported"] = _built(ReportedCharge, reported)
    for name in ("total_cost", "previous_total_cost", "delta_cost"):
        doc[name] = Decimal(doc[name])
    for name in ("occurred_at", "recorded_at", "priced_at"):
        doc[name] = doc[name].astimezone(UTC)
    return _built(UsagePriced, doc)


_E = TypeVar("_E", UsageRecorded, UsagePriced)
_F = TypeVar("_F", bound=BaseModel)

EVENT_TYPES: Final[dict[str, type[BaseModel]]] = {
    "UsageRecorded": UsageRecorded,
    "UsagePriced": UsagePriced,
    "QuotaAlert": QuotaAlert,
    "InvoiceIssued": InvoiceIssued,
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


_FIELD_NAMES: Final = frozenset(
    name
    for model in (UsageRecorded, UsagePriced, UsageCounts, ReportedCharge, Breakdown)
    for name in model.model_fields
) | {"[key]"}
