"""A model's price list, parsed from an OpenRouter pricing object.

All prices are USD ``Decimal`` per token (``request`` per call, ``web_search`` per search,
``image`` per image). Two catalogue shapes exist: the 2025 one lists every key (zeros as
``"0"``, ``internal_reasoning: "0"``); the 2026 one omits zero keys and adds
``input_cache_write_1h`` and ``overrides`` (long-context tiers, time-of-day windows).

A price of ``"-1"`` means the model has no fixed price (OpenRouter's routers); such a model
is not billable and :func:`parse_pricing` raises ``VariablePricing``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from services.core.errors import PricingError, VariablePricing
from services.core.money import ZERO, fmt, to_decimal

PRICE_KEYS: Final = (
    "prompt",
    "completion",
    "request",
    "image",
    "web_search",
    "internal_reasoning",
    "input_cache_read",
    "input_cache_write",
    "input_cache_write_1h",
)
CONDITION_KEYS: Final = ("min_prompt_tokens", "utc_start", "utc_end")


@dataclass(frozen=True, slots=True)
class Tier:
    """An ``overrides`` entry: prices that replace the base ones when its conditions hold."""

    prices: Mapping[str, Decimal]
    min_prompt_tokens: int | None = None
    utc_start: int | None = None
    """Start of a daily UTC window as HHMM (e.g. 1000 = 10:00); the window may wrap midnight."""
    utc_end: int | None = None

    def applies(self, prompt_tokens: int, at: datetime | None) -> bool:
        if self.min_prompt_tokens is not None and prompt_tokens <= self.min_prompt_tokens:
            return False
        if self.utc_start is not None and self.utc_end is not None:
            if at is None:
                return False
            utc = at.astimezone(UTC) if at.utcoffset() else at
            hhmm = utc.hour * 100 + utc.minute
            if self.utc_start <= self.utc_end:
                return self.utc_start <= hhmm < self.utc_end
            return hhmm >= self.utc_start or hhmm < self.utc_end
        return True

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in CONDITION_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out.update({k: fmt(v) for k, v in self.prices.items()})
        return out


@dataclass(frozen=True, slots=True)
class ModelPricing:
    """Base prices plus optional tiers. Absent optional prices are ``None``, not zero."""

    prompt: Decimal
    completion: Decimal
    request: Decimal = ZERO
    image: Decimal = ZERO
    web_search: Decimal = ZERO
    internal_reasoning: Decimal | None = None
    input_cache_read: Decimal | None = None
    input_cache_write: Decimal | None = None
    input_cache_write_1h: Decimal | None = None
    tiers: tuple[Tier, ...] = ()
    extra: Mapping[str, str] = field(default_factory=dict)
    """Catalogue keys this engine does not bill (audio, image output, ...), kept for display."""

    def for_request(
        self, prompt_tokens: int, at: datetime | None
    ) -> tuple[ModelPricing, Tier | None]:
        """The prices that apply to one request, and the tier that supplied them (if any).

        Among applicable tiers later entries win per key; keys a tier omits keep the base price.
        """
        chosen: Tier | None = None
        prices = self
        for tier in self.tiers:
            if tier.applies(prompt_tokens, at):
                prices = replace(prices, **tier.prices)  # type: ignore[arg-type]
                chosen = tier
        return prices, chosen

    def to_json(self) -> dict[str, Any]:
        """The OpenRouter-style pricing object, prices as decimal strings."""
        out: dict[str, Any] = {}
        for key in PRICE_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = fmt(value)
        out.update(self.extra)
        if self.tiers:
            out["overrides"] = [tier.describe() for tier in self.tiers]
        return out


def _price(raw: Mapping[str, Any], key: str, path: str) -> Decimal | None:
    value = raw.get(key)
    if value is None:
        return None
    try:
        price = to_decimal(value)
    except ValueError as exc:
        raise PricingError(f"{path}{key}", str(exc)) from None
    if price < 0:
        raise PricingError(f"{path}{key}", f"must not be negative, got {value!r}")
    return price


def _condition(raw: Mapping[str, Any], key: str, path: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise PricingError(f"{path}{key}", f"must be a non-negative integer, got {value!r}")
    return value


def _parse_tier(raw: object, index: int) -> Tier:
    path = f"overrides[{index}]."
    if not isinstance(raw, Mapping):
        raise PricingError(f"overrides[{index}]", "must be an object")
    prices: dict[str, Decimal] = {}
    for key in PRICE_KEYS:
        value = _price(raw, key, path)
        if value is not None:
            prices[key] = value
    tier = Tier(
        prices=prices,
        min_prompt_tokens=_condition(raw, "min_prompt_tokens", path),
        utc_start=_condition(raw, "utc_start", path),
        utc_end=_condition(raw, "utc_end", path),
    )
    if (tier.utc_start is None) != (tier.utc_end is None):
        raise PricingError(f"{path}utc_start", "utc_start and utc_end come together")
    return tier


def parse_pricing(raw: object, model: str = "") -> ModelPricing:
    """Parse an OpenRouter pricing object (either catalogue shape) into ``ModelPricing``."""
    if not isinstance(raw, Mapping):
        raise PricingError("", f"must be an object, got {type(raw).__name__}")
    if _is_variable(raw.get("prompt")) or _is_variable(raw.get("completion")):
        raise VariablePricing(model, reason=f"model {model!r} has a variable price (-1)")
    prices: dict[str, Decimal | None] = {key: _price(raw, key, "") for key in PRICE_KEYS}
    for key in ("prompt", "completion"):
        if prices[key] is None:
            raise PricingError(key, "is required")
    # The 2025 catalogue writes internal_reasoning "0" for every model, meaning "no separate
    # price", not "reasoning is free": only a non-zero price is a distinct reasoning rate.
    if not prices["internal_reasoning"]:
        prices["internal_reasoning"] = None
    overrides = raw.get("overrides")
    if overrides is None:
        overrides = []
    if not isinstance(overrides, list):
        raise PricingError("overrides", "must be a list")
    extra = {
        key: str(value)
        for key, value in raw.items()
        if key not in PRICE_KEYS and key != "overrides" and isinstance(value, str | int)
    }
    return ModelPricing(
        prompt=prices["prompt"] or ZERO,
        completion=prices["completion"] or ZERO,
        request=prices["request"] or ZERO,
        image=prices["image"] or ZERO,
        web_search=prices["web_search"] or ZERO,
        internal_reasoning=prices["internal_reasoning"],
        input_cache_read=prices["input_cache_read"],
        input_cache_write=prices["input_cache_write"],
        input_cache_write_1h=prices["input_cache_write_1h"],
        tiers=tuple(_parse_tier(t, i) for i, t in enumerate(overrides)),
        extra=extra,
    )


def _is_variable(value: object) -> bool:
    return isinstance(value, str | int | Decimal) and str(value).strip() == "-1"
