"""What an LLM answer carried, as far as billing goes, and the usage event it becomes.

The forwarder (``proxy.py``) passes every answer through a :class:`Seen` (a JSON body) or a
:class:`StreamReader` (an SSE stream, line by line as it passes) and then calls
:func:`bill`: the upstream's usage when it reported some, a tokenizer estimate when a
successful answer carried none, nothing for a failed request without usage. What differs
between upstream APIs — where usage and text live in a document, the usage format, the
provider — is a :class:`Dialect`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import orjson
from pydantic import TypeAdapter, ValidationError

from services.adapters import metrics
from services.core.errors import BillingError
from services.core.events import Identifier, ReportedCharge, UsageCounts, UsageRecorded
from services.core.usage import Usage, parse_usage
from services.gateway.emitter import Emitter
from services.gateway.keys import TenantKey

log = logging.getLogger("billing.proxy")


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one upstream API carries usage and text."""

    provider: str
    usage_format: str
    route: str
    usage_of: Callable[[Mapping[str, Any]], Any]
    """The usage object of a body or stream chunk, or ``None`` when it has none."""
    text_of: Callable[[Mapping[str, Any]], str]
    """The generated text in a body or stream chunk (for estimating a cut stream)."""
    estimate: Callable[[str, Mapping[str, Any], str], Usage]
    """``(model, request body, generated text)`` → estimated usage (runs off the loop)."""
    prompt_tokens: Callable[[str, Mapping[str, Any]], int]
    """``(model, request body)`` → its input tokens, counted locally (for a reservation)."""
    max_output: Callable[[Mapping[str, Any]], tuple[int | None, int]]
    """(output token limit per choice or ``None`` when the body sets none, choices asked)."""


def _openai_text(document: Mapping[str, Any]) -> str:
    parts: list[str] = []
    for choice in document.get("choices") or ():
        if not isinstance(choice, Mapping):
            continue
        for key in ("delta", "message"):
            message = choice.get(key)
            if isinstance(message, Mapping):
                for field in ("reasoning", "content"):
                    value = message.get(field)
                    if isinstance(value, str):
                        parts.append(value)
    return "".join(parts)


def _estimate_openai(model: str, body: Mapping[str, Any], text: str) -> Usage:
    from services.gateway.tokens import estimate_usage

    return estimate_usage(model, body, text)


def _openai_prompt_tokens(model: str, body: Mapping[str, Any]) -> int:
    from services.gateway.tokens import prompt_tokens

    return prompt_tokens(model, body)


def _openai_max_output(body: Mapping[str, Any]) -> tuple[int | None, int]:
    """``max_completion_tokens`` (reasoning included) or ``max_tokens``; ``n`` choices."""
    limit = positive_int(body.get("max_completion_tokens")) or positive_int(body.get("max_tokens"))
    return limit, positive_int(body.get("n")) or 1


def positive_int(value: object) -> int | None:
    """``value`` if it is a positive integer (not a bool), else ``None``."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


OPENAI = Dialect(
    provider="openrouter",
    usage_format="openai",
    route="/v1/chat/completions",
    usage_of=lambda document: document.get("usage"),
    text_of=_openai_text,
    estimate=_estimate_openai,
    prompt_tokens=_openai_prompt_tokens,
    max_output=_openai_max_output,
)


_MODEL_ID: TypeAdapter[str] = TypeAdapter(Identifier)


def model_problem(model: str) -> str | None:
    """Why ``model`` cannot be billed (the rules of ``UsageRecorded.provider_model_id``: 1 to
    256 characters, no NUL, valid Unicode), or ``None``: a request for it is not forwarded."""
    try:
        _MODEL_ID.validate_python(model)
    except ValidationError as exc:
        return f"invalid model name {model!r:.80}: {exc.errors()[0]['msg']}"
    return None


@dataclass(frozen=True, slots=True)
class Call:
    """One proxied request: who asked, for what, and what to send upstream."""

    key: TenantKey
    dialect: Dialect
    model: str
    """The model as the price book names it (``google/…`` for Gemini)."""
    body: Mapping[str, Any]
    request_id: str
    started: datetime


def usage_event(call: Call, usage: Any) -> UsageRecorded | None:
    """The fact to bill from the upstream's usage, or ``None`` (logged and counted) when it
    cannot be read — the caller estimates instead."""
    try:
        parsed = parse_usage({"usage": usage}, call.dialect.usage_format)
        return _event(call, parsed.usage, parsed.format, ReportedCharge.of(parsed.reported))
    except (BillingError, ValidationError) as exc:
        log.error("unreadable usage from upstream for %s (estimating): %s", call.request_id, exc)
        metrics.UNBILLABLE.labels(reason="unreadable_usage").inc()
        return None


def estimated_event(call: Call, text: str) -> UsageRecorded | None:
    """The fact to bill when the upstream reported nothing: counted with a tokenizer, or
    ``None`` (logged and counted) when even that fails."""
    try:
        usage = call.dialect.estimate(call.model, call.body, text)
        return _event(call, usage, "normalised", None, source="estimated")
    except Exception:
        log.exception("could not estimate usage for %s: it is not billed", call.request_id)
        metrics.UNBILLABLE.labels(reason="estimate_failed").inc()
        return None


def _event(
    call: Call,
    usage: Usage,
    usage_format: str,
    reported: ReportedCharge | None,
    source: Literal["upstream", "estimated"] = "upstream",
) -> UsageRecorded:
    return UsageRecorded(
        request_id=call.request_id,
        tenant_id=call.key.tenant_id,
        api_key_id=call.key.key_id,
        provider=call.dialect.provider,
        provider_model_id=call.model,
        occurred_at=call.started,
        recorded_at=datetime.now(UTC),
        usage=UsageCounts.of(usage),
        usage_source=source,
        usage_format=usage_format,
        reported=reported,
        metadata={"route": call.dialect.route},
    )


@dataclass(slots=True)
class Seen:
    """What an answer carried, as far as billing goes."""

    usage: Any = None
    """The last usage object seen (a stream's final chunk carries it)."""
    text: list[str] = field(default_factory=list)
    error: bool = False
    """An error object came with a 2xx status (some upstreams report failures so)."""
    dialect: Dialect | None = None
    unread: list[bytes] = field(default_factory=list)
    """A stream's data lines not observed yet (see :class:`StreamReader`)."""

    def observe(self, dialect: Dialect, document: Mapping[str, Any]) -> None:
        try:
            usage = dialect.usage_of(document)
            text = dialect.text_of(document)
        except (TypeError, AttributeError, ValueError) as exc:  # a malformed chunk
            log.warning("ignoring a malformed upstream document: %r", exc)
            return
        if usage is not None:
            self.usage = usage
        if text:
            self.text.append(text)
        if document.get("error") is not None:
            self.error = True

    def settle(self) -> None:
        """Observe the lines left unread, in order: their text and errors are wanted."""
        if self.dialect is not None:
            for data in self.unread:
                document = _parse(data, self.dialect)
                if isinstance(document, dict):
                    self.observe(self.dialect, document)
        self.unread.clear()


class StreamReader:
    """Follows an SSE stream as it passes, line by line.

    A line is kept unparsed until it is needed: at the stream's end the lines are searched
    from the last for usage (usually the last one has it), and the others — the generated
    text, needed only to estimate an answer without usage — are parsed only then
    (:meth:`Seen.settle`), or whenever ``MAX_UNREAD`` bytes of them have piled up (a long
    stream's memory stays bounded). Parsing every chunk as it passed was ~0.1 ms per
    streamed request."""

    MAX_UNREAD = 256 * 1024

    __slots__ = ("dialect", "tail", "seen", "max_unread", "_unread_bytes")

    def __init__(self, dialect: Dialect, max_unread: int = MAX_UNREAD) -> None:
        self.dialect = dialect
        self.max_unread = max_unread
        self.tail = b""
        self.seen = Seen(dialect=dialect)
        self._unread_bytes = 0

    def feed(self, chunk: bytes) -> None:
        self.tail += chunk
        *lines, self.tail = self.tail.split(b"\n")
        for line in lines:
            self._line(line)
        if self._unread_bytes > self.max_unread:
            self.seen.settle()
            self._unread_bytes = 0

    def end(self) -> None:
        if self.tail:
            self._line(self.tail)
            self.tail = b""
        for data in reversed(self.seen.unread):
            document = _parse(data, self.dialect)
            usage = _usage_of(self.dialect, document)
            if usage is not None:
                self.seen.usage = usage  # the last usage sent
                return

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            return
        self.seen.unread.append(line[5:])
        self._unread_bytes += len(line)


def _parse(data: bytes, dialect: Dialect) -> Any:
    """One chunk's JSON; a chunk carrying usage with its non-integers as ``Decimal``."""
    try:
        # orjson: ~4x faster than json for the many chunks without usage ...
        document = orjson.loads(data)
    except orjson.JSONDecodeError:  # NaN, a 65-bit integer: json reads them
        return _exact(data)
    if _usage_of(dialect, document) is not None:
        return _exact(data)  # ... and the usage-bearing one again, numbers exact
    return document


def _exact(data: bytes) -> Any:
    """A JSON document with its non-integers as ``Decimal`` (``None`` if it is not JSON,
    or nested too deep to read)."""
    try:
        return json.loads(data, parse_float=Decimal)
    except (ValueError, RecursionError):
        return None


def _usage_of(dialect: Dialect, document: Any) -> Any:
    """The usage :meth:`Seen.observe` would take from ``document``, or ``None``."""
    if not isinstance(document, dict):
        return None
    try:
        usage = dialect.usage_of(document)
        dialect.text_of(document)  # a chunk whose text cannot be read is ignored whole
    except (TypeError, AttributeError, ValueError):
        return None
    return usage


@dataclass(frozen=True, slots=True)
class Billed:
    """What :func:`bill` did: nothing (``billed`` false), or emitted usage — ``event`` when
    the upstream's is known now, ``None`` when an estimate is being counted off the loop."""

    billed: bool
    event: UsageRecorded | None = None


NOT_BILLED = Billed(False)


def bill(emitter: Emitter, call: Call, seen: Seen, succeeded: bool) -> Billed:
    """Bill from the upstream's usage; without readable usage, from an estimate — unless the
    request failed, or its 2xx answer was an error with nothing generated."""
    if seen.usage is not None:
        event = usage_event(call, seen.usage)
        if event is not None:
            emitter.submit(event)
            return Billed(True, event)
    elif not succeeded:
        return NOT_BILLED  # a failed request is billed only when the upstream reported usage
    seen.settle()  # the generated text, to estimate from
    text = "".join(seen.text)
    if seen.error and not text:
        return NOT_BILLED
    emitter.submit_later(lambda: estimated_event(call, text))
    return Billed(True)
