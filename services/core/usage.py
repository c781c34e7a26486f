"""One usage shape for every provider, and the parsers that normalise into it.

Providers disagree on what their counts contain:

* OpenRouter / OpenAI Chat Completions and the Responses API: cache reads and cache writes are
  parts of ``prompt_tokens`` (``input_tokens``); reasoning is part of ``completion_tokens``.
* Anthropic Messages: ``input_tokens`` *excludes* cache reads and writes; writes are split into
  5-minute and 1-hour TTLs under ``cache_creation``.
* Gemini / Vertex ``usageMetadata``: ``cachedContentTokenCount`` is part of
  ``promptTokenCount``, but ``thoughtsTokenCount`` is *not* part of ``candidatesTokenCount``.

Every parser produces a :class:`Usage` in which ``prompt_tokens`` holds all input tokens and
``completion_tokens`` all output tokens (reasoning included), then checks that the parts add
up. Anything that does not raises :class:`UsageError` naming the field: it is never priced.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Final, Literal, NamedTuple

from services.core.errors import UsageError
from services.core.money import to_decimal

UsageFormat = Literal["openai", "openai_responses", "anthropic", "gemini", "normalised"]
USAGE_FORMATS: Final = ("openai", "openai_responses", "anthropic", "gemini", "normalised")


class Usage(NamedTuple):
    """Normalised token counts of one request (all integers, never negative).

    An immutable tuple rather than a frozen dataclass: one is built per billed request, and
    a tuple is several times cheaper to construct.
    """

    prompt_tokens: int = 0
    """Every input token, cached or not (the quantity long-context tiers are chosen by)."""
    uncached_input_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    """Cache writes at the default (5-minute) TTL."""
    cache_write_1h_tokens: int = 0
    completion_tokens: int = 0
    """Every output token, reasoning included."""
    reasoning_tokens: int = 0
    web_search_requests: int = 0
    images: int = 0
    requests: int = 1

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self._fields, self, strict=True))


class ReportedCost(NamedTuple):
    """What the upstream said it charged, kept beside our own computation."""

    cost: Decimal | None = None
    upstream_inference_cost: Decimal | None = None
    is_byok: bool = False

    @property
    def provider_charge(self) -> Decimal | None:
        """The inference charge to reconcile against.

        With BYOK, ``cost`` is only OpenRouter's fee and the provider's charge is
        ``cost_details.upstream_inference_cost``.
        """
        if self.is_byok and self.upstream_inference_cost is not None:
            return self.upstream_inference_cost
        return self.cost


class ParsedUsage(NamedTuple):
    usage: Usage
    format: UsageFormat
    reported: ReportedCost | None = None


# ---------------------------------------------------------------------------------------------
# small readers that name the field on error (the path is joined only when raising: these run
# once per billed request, so the happy path builds no strings)


MAX_COUNT: Final = 10**12
"""No count of one request reaches a trillion; larger ones are refused, not priced."""


def _count(obj: Mapping[str, Any], key: str, *where: str) -> int:
    value = obj.get(key)
    if type(value) is int and 0 <= value < MAX_COUNT:
        return value
    if value is None:
        return 0
    if type(value) is not int:
        raise UsageError(_at(where, key), f"must be a non-negative integer, got {value!r:.40}")
    if value < 0:
        raise UsageError(_at(where, key), f"must not be negative, got {value}")
    # Not "{value:.3g}": an integer of 310 digits or more does not convert to a float.
    digits = len(str(value)) if value.bit_length() < 14_000 else "thousands of"
    raise UsageError(_at(where, key), f"a {digits}-digit count is out of range (below 10^12)")


def _required_count(obj: Mapping[str, Any], key: str, *where: str) -> int:
    if obj.get(key) is None:
        raise UsageError(_at(where, key), "is required")
    return _count(obj, key, *where)


def _section(obj: Mapping[str, Any], key: str, *where: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if type(value) is dict or isinstance(value, Mapping):
        return value
    if value is None:
        return _EMPTY
    raise UsageError(_at(where, key), f"must be an object, got {_json_type(value)}")


_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _at(where: tuple[str, ...], key: str) -> str:
    return ".".join((*where, key))


def _above(part: int, part_field: str, whole: int, whole_field: str) -> UsageError:
    return UsageError(part_field, f"{part} exceeds {whole_field} ({whole})")


def _split_prompt(prompt: int, read: int, write: int, write_1h: int, path: str) -> int:
    """Uncached input tokens, given cache reads and writes that are parts of ``prompt``.

    Gemini's explicit cache reports the tokens it wrote as read too (reads + writes exceed
    the prompt); the uncached part is then prompt - reads.
    """
    writes = write + write_1h
    if read + writes <= prompt:
        return prompt - read - writes
    if writes <= read:
        return prompt - read
    raise UsageError(
        f"{path}.prompt_tokens",
        f"cache reads ({read}) and writes ({writes}) exceed the prompt ({prompt})",
    )


def _reported(usage: Mapping[str, Any], path: str) -> ReportedCost | None:
    cost_raw = usage.get("cost")
    details = usage.get("cost_details")
    if cost_raw is None and not details:
        return None
    details = _section(usage, "cost_details", path)
    upstream_raw = details.get("upstream_inference_cost")
    if cost_raw is None and upstream_raw is None:
        return None
    byok = usage.get("is_byok", False)
    if not isinstance(byok, bool):
        raise UsageError(f"{path}.is_byok", f"must be a boolean, got {byok!r}")
    return ReportedCost(
        cost=_money(cost_raw, f"{path}.cost"),
        upstream_inference_cost=_money(
            upstream_raw, f"{path}.cost_details.upstream_inference_cost"
        ),
        is_byok=byok,
    )


def _money(value: object, field: str) -> Decimal | None:
    if value is None:
        return None
    try:
        amount = to_decimal(value)
    except ValueError as exc:
        raise UsageError(field, str(exc)) from None
    if amount < 0:
        raise UsageError(field, f"must not be negative, got {value}")
    return amount


# ---------------------------------------------------------------------------------------------
# parsers, one per wire format


def parse_openai(u: Mapping[str, Any], path: str = "usage") -> ParsedUsage:
    """OpenRouter / OpenAI Chat Completions ``usage``."""
    return _from_openai_like(u, path, _CHAT_NAMES, "openai")


def parse_openai_responses(u: Mapping[str, Any], path: str = "usage") -> ParsedUsage:
    """OpenAI / OpenRouter Responses API ``usage`` (``input_tokens`` include cached ones)."""
    return _from_openai_like(u, path, _RESPONSES_NAMES, "openai_responses")


# (input total, output total, input details, output details) in each API's spelling
_CHAT_NAMES = (
    "prompt_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
)
_RESPONSES_NAMES = (
    "input_tokens",
    "output_tokens",
    "input_tokens_details",
    "output_tokens_details",
)


def _from_openai_like(
    u: Mapping[str, Any], path: str, names: tuple[str, str, str, str], fmt: UsageFormat
) -> ParsedUsage:
    prompt_key, completion_key, in_key, out_key = names
    prompt = _required_count(u, prompt_key, path)
    completion = _count(u, completion_key, path)
    prompt_details = _section(u, in_key, path)
    read = _count(prompt_details, "cached_tokens", path, in_key)
    write = _count(prompt_details, "cache_write_tokens", path, in_key)
    reasoning = _count(_section(u, out_key, path), "reasoning_tokens", path, out_key)
    tools = _section(u, "server_tool_use_details", path)
    searches = _count(tools, "web_search_requests", path, "server_tool_use_details")

    if read > prompt:
        raise _above(read, f"{path}.{in_key}.cached_tokens", prompt, f"{path}.{prompt_key}")
    if write > prompt:
        raise _above(write, f"{path}.{in_key}.cache_write_tokens", prompt, f"{path}.{prompt_key}")
    if reasoning > completion:
        field = f"{path}.{out_key}.reasoning_tokens"
        raise _above(reasoning, field, completion, f"{path}.{completion_key}")
    total = u.get("total_tokens")
    if total is not None and _count(u, "total_tokens", path) != prompt + completion:
        raise UsageError(
            f"{path}.total_tokens",
            f"{total} is not {prompt_key} + {completion_key} ({prompt} + {completion})",
        )
    usage = Usage(
        prompt_tokens=prompt,
        uncached_input_tokens=_split_prompt(prompt, read, write, 0, path),
        cache_read_tokens=read,
        cache_write_tokens=write,
        completion_tokens=completion,
        reasoning_tokens=reasoning,
        web_search_requests=searches,
        images=_count(u, "images", path),
    )
    return ParsedUsage(usage, fmt, _reported(u, path))


def parse_anthropic(u: Mapping[str, Any], path: str = "usage") -> ParsedUsage:
    """Anthropic Messages ``usage``: ``input_tokens`` exclude cache reads and writes."""
    uncached = _required_count(u, "input_tokens", path)
    read = _count(u, "cache_read_input_tokens", path)
    created = _count(u, "cache_creation_input_tokens", path)
    split = _section(u, "cache_creation", path)
    if split:
        write_5m = _count(split, "ephemeral_5m_input_tokens", path, "cache_creation")
        write_1h = _count(split, "ephemeral_1h_input_tokens", path, "cache_creation")
        if "cache_creation_input_tokens" in u and write_5m + write_1h != created:
            raise UsageError(
                f"{path}.cache_creation",
                f"5m ({write_5m}) + 1h ({write_1h}) writes differ from "
                f"cache_creation_input_tokens ({created})",
            )
    else:
        write_5m, write_1h = created, 0
    completion = _count(u, "output_tokens", path)
    tools = _section(u, "server_tool_use", path)
    usage = Usage(
        prompt_tokens=uncached + read + write_5m + write_1h,
        uncached_input_tokens=uncached,
        cache_read_tokens=read,
        cache_write_tokens=write_5m,
        cache_write_1h_tokens=write_1h,
        completion_tokens=completion,
        web_search_requests=_count(tools, "web_search_requests", path, "server_tool_use"),
    )
    return ParsedUsage(usage, "anthropic", _reported(u, path))


def parse_gemini(u: Mapping[str, Any], path: str = "usageMetadata") -> ParsedUsage:
    """Gemini / Vertex ``usageMetadata``: thoughts are *not* inside ``candidatesTokenCount``.

    ``promptTokenCount`` is required: a streaming response's early chunks carry a
    ``usageMetadata`` without counts, and pricing one of those would bill the request at $0.
    """
    prompt = _required_count(u, "promptTokenCount", path)
    tool_prompt = _count(u, "toolUsePromptTokenCount", path)
    cached = _count(u, "cachedContentTokenCount", path)
    candidates = _count(u, "candidatesTokenCount", path)
    thoughts = _count(u, "thoughtsTokenCount", path)
    if cached > prompt:
        field = f"{path}.cachedContentTokenCount"
        raise _above(cached, field, prompt, f"{path}.promptTokenCount")
    total = u.get("totalTokenCount")
    expected = prompt + tool_prompt + candidates + thoughts
    if total is not None and _count(u, "totalTokenCount", path) != expected:
        raise UsageError(
            f"{path}.totalTokenCount",
            f"{total} is not prompt + toolUsePrompt + candidates + thoughts ({expected})",
        )
    usage = Usage(
        prompt_tokens=prompt + tool_prompt,
        uncached_input_tokens=prompt + tool_prompt - cached,
        cache_read_tokens=cached,
        completion_tokens=candidates + thoughts,
        reasoning_tokens=thoughts,
    )
    return ParsedUsage(usage, "gemini", None)


def parse_normalised(u: Mapping[str, Any], path: str = "usage") -> ParsedUsage:
    """This project's own :class:`Usage` shape (as carried by billing events)."""
    unknown = sorted(str(key) for key in u if key not in Usage._fields)
    if unknown:
        raise UsageError(f"{path}.{unknown[0]}", "is not a field of the normalised usage")
    counts = {name: _count(u, name, path) for name in Usage._fields}
    if u.get("requests") is None:
        counts["requests"] = 1
    usage = Usage(**counts)
    check_usage(usage, path)
    return ParsedUsage(usage, "normalised", None)


def check_usage(usage: Usage, path: str = "usage") -> None:
    """Raise ``UsageError`` unless the normalised parts add up to their totals."""
    if usage.reasoning_tokens > usage.completion_tokens:
        raise _above(
            usage.reasoning_tokens,
            f"{path}.reasoning_tokens",
            usage.completion_tokens,
            f"{path}.completion_tokens",
        )
    uncached = _split_prompt(
        usage.prompt_tokens,
        usage.cache_read_tokens,
        usage.cache_write_tokens,
        usage.cache_write_1h_tokens,
        path,
    )
    if uncached != usage.uncached_input_tokens:
        raise UsageError(
            f"{path}.uncached_input_tokens",
            f"{usage.uncached_input_tokens} does not equal prompt minus cache reads and writes "
            f"({uncached})",
        )


_PARSERS = {
    "openai": parse_openai,
    "openai_responses": parse_openai_responses,
    "anthropic": parse_anthropic,
    "gemini": parse_gemini,
    "normalised": parse_normalised,
}


def detect_format(u: Mapping[str, Any]) -> UsageFormat:
    """Guess the wire format of a bare usage object from its keys."""
    if "prompt_tokens" in u and "uncached_input_tokens" in u:
        return "normalised"
    if "prompt_tokens" in u:
        return "openai"
    if "promptTokenCount" in u or "candidatesTokenCount" in u or "totalTokenCount" in u:
        return "gemini"
    if "input_tokens" in u:
        # The Responses API always reports totals and details; Anthropic never does. Bare
        # input/output counts read the same either way, and Anthropic's reading keeps its
        # ``server_tool_use`` web searches.
        responses = ("total_tokens", "input_tokens_details", "output_tokens_details")
        return "openai_responses" if any(k in u for k in responses) else "anthropic"
    raise UsageError("usage", "unrecognised usage shape: no prompt/input token count found")


def parse_usage(obj: object, fmt: str | None = None) -> ParsedUsage:
    """Normalise any supported usage object; ``fmt`` names the format when it is known.

    Accepts the bare usage object or one nested under ``usage`` / ``usageMetadata`` (so a
    whole response body works too).
    """
    if obj is None:
        raise UsageError("usage", "is required (an object of token counts)")
    if not isinstance(obj, Mapping):
        raise UsageError("usage", f"must be an object, got {_json_type(obj)}")
    body: Mapping[str, Any] = obj
    path = "usage"
    nested = obj.get("usage")
    if nested is None and "usageMetadata" in obj:
        nested, fmt = obj["usageMetadata"], fmt or "gemini"
        path = "usage.usageMetadata"
    elif nested is not None:
        path = "usage.usage"
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise UsageError(path, f"must be an object, got {_json_type(nested)}")
        body = nested
    if fmt is None:
        fmt = detect_format(body)
    parser = _PARSERS.get(fmt)
    if parser is None:
        known = ", ".join(USAGE_FORMATS)
        raise UsageError("format", f"unknown usage format {fmt!r}; one of {known}")
    return parser(body, path)


def _json_type(value: object) -> str:
    """How a JSON document names the type of ``value`` (an error message's words)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float | Decimal):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    return type(value).__name__
