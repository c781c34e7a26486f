"""The proxies: forward a tenant's LLM request upstream, pass the answer through, bill it.

``POST /v1/chat/completions`` (OpenAI-compatible, to OpenRouter) and the Gemini-native
routes share one forwarder. It authenticates the tenant's API key (401 without contacting
the upstream), forwards the body with the gateway's own upstream credentials, and passes
the answer back — a stream chunk by chunk, never buffered whole. Usage comes from the JSON
body or the stream's last usage-bearing chunk; the ``UsageRecorded`` goes to the emitter,
off the request path. When a successful answer carries no usage (the client went away
mid-stream, the upstream cut the stream or left usage out) the usage is estimated with a
tokenizer and marked ``usage_source="estimated"``. An upstream error is passed through with
its status and billed only when it carries usage.

What differs between upstream APIs — where usage and text live in a document, the usage
format, the provider and the model the price book knows — is a :class:`Dialect`.
"""

from __future__ import annotations

import json
import logging
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import anyio
import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from services.adapters import metrics
from services.core.errors import BillingError
from services.core.events import ReportedCharge, UsageCounts, UsageRecorded
from services.core.usage import Usage, parse_usage
from services.gateway.auth import TenantKey, require_tenant

log = logging.getLogger("billing.proxy")
router = APIRouter()

NOT_RELAYED = frozenset(
    {"content-length", "transfer-encoding", "connection", "content-encoding", "date", "server"}
)
"""Upstream response headers the gateway's own server sets (or, for the body's encoding,
undoes: the answer is relayed decoded)."""
FORWARDED = frozenset({"http-referer", "x-title"})
"""Client request headers passed upstream: OpenRouter's app attribution. Everything else —
credentials above all — stays here."""


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


OPENAI = Dialect(
    provider="openrouter",
    usage_format="openai",
    route="/v1/chat/completions",
    usage_of=lambda document: document.get("usage"),
    text_of=_openai_text,
    estimate=_estimate_openai,
)


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


PROXY_PATHS = ("/v1/chat/", "/v1/models", "/v1beta/")
"""Routes whose errors take the LLM APIs' shape (their SDKs read it), not ``{"error": str}``."""
_KINDS = {
    400: ("invalid_request_error", "INVALID_ARGUMENT"),
    401: ("authentication_error", "UNAUTHENTICATED"),
    403: ("permission_error", "PERMISSION_DENIED"),
    404: ("not_found_error", "NOT_FOUND"),
    429: ("rate_limit_error", "RESOURCE_EXHAUSTED"),
    502: ("api_error", "UNAVAILABLE"),
    503: ("api_error", "UNAVAILABLE"),
    504: ("api_error", "DEADLINE_EXCEEDED"),
}


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """An error both SDK families read: OpenAI's ``message``/``type``/``code`` and
    Google's ``code``/``message``/``status`` in one object."""
    kind, google = _KINDS.get(
        status,
        (
            "api_error" if status >= 500 else "invalid_request_error",
            "INTERNAL" if status >= 500 else "FAILED_PRECONDITION",
        ),
    )
    body = {"error": {"message": message, "type": kind, "code": status, "status": google}}
    return Response(
        json.dumps(body).encode(),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def parse_body(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


class InFlight:
    """Counts proxied requests being served, up to a limit (admission control)."""

    __slots__ = ("limit", "count")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def enter(self) -> bool:
        if self.count >= self.limit:
            return False
        self.count += 1
        return True

    def leave(self) -> None:
        self.count -= 1


async def forward(
    request: Request,
    call: Call,
    upstream: httpx.Request,
    client: httpx.AsyncClient,
    *,
    stream: bool,
) -> Response:
    """Send ``upstream``, pass its answer back and bill it through the emitter."""
    state = request.app.state
    emitter = state.emitter
    if not emitter.accepting:
        metrics.PROXY_REFUSED.labels(reason="spool").inc()
        return error(503, "usage spool is full; try again later", {"retry-after": "5"})
    in_flight: InFlight | None = getattr(state, "in_flight", None)
    if in_flight is not None and not in_flight.enter():
        metrics.PROXY_REFUSED.labels(reason="overload").inc()
        return error(503, "the gateway is at capacity; try again shortly", {"retry-after": "1"})
    try:
        response = await _send(request, call, upstream, client, stream=stream)
    except BaseException:
        if in_flight is not None:
            in_flight.leave()
        raise
    if in_flight is not None:
        if isinstance(response, StreamingResponse):
            # Served until the stream is done with, however it ends (finished, client gone,
            # never started): when its body iterator is freed.
            weakref.finalize(response.body_iterator, in_flight.leave)
        else:
            in_flight.leave()
    return response


async def _send(
    request: Request,
    call: Call,
    upstream: httpx.Request,
    client: httpx.AsyncClient,
    *,
    stream: bool,
) -> Response:
    state = request.app.state
    emitter = state.emitter
    try:
        response = await client.send(upstream, stream=True)
    except httpx.TimeoutException:
        return error(504, "upstream timed out")
    except httpx.TransportError as exc:
        log.warning("upstream unreachable for %s: %r", call.request_id, exc)
        return error(502, "upstream unreachable")
    headers = {k: v for k, v in response.headers.items() if k.lower() not in NOT_RELAYED}
    headers["x-billing-request-id"] = call.request_id
    succeeded = response.is_success
    bill = state.emit_usage

    if not stream:
        try:
            content = await response.aread()
        except httpx.HTTPError as exc:  # the answer broke off after its status line
            log.warning("upstream answer cut for %s: %r", call.request_id, exc)
            if bill and succeeded:
                _bill(emitter, call, _Seen(), succeeded)  # the prompt was processed
            timed_out = isinstance(exc, httpx.TimeoutException)
            return error(504 if timed_out else 502, "the upstream's answer broke off")
        finally:
            await response.aclose()
        if bill:
            seen = _Seen()
            try:
                answer = json.loads(content, parse_float=Decimal)
            except ValueError:
                answer = None  # not JSON (an upstream error page)
            if isinstance(answer, dict):
                seen.observe(call.dialect, answer)
            _bill(emitter, call, seen, succeeded)
        return Response(content, status_code=response.status_code, headers=headers)

    async def relay() -> AsyncIterator[bytes]:
        reader = _StreamReader(call.dialect)
        try:
            async for chunk in response.aiter_bytes():  # decoded, as it arrives
                reader.feed(chunk)
                yield chunk
        finally:
            reader.end()
            # Billing first and without awaiting: a client that went away cancels this
            # generator, and any further await would be cancelled with it.
            if bill:
                _bill(emitter, call, reader.seen, succeeded)
            with anyio.CancelScope(shield=True):
                await response.aclose()

    return StreamingResponse(relay(), status_code=response.status_code, headers=headers)


@dataclass(slots=True)
class _Seen:
    """What an answer carried, as far as billing goes."""

    usage: Any = None
    """The last usage object seen (a stream's final chunk carries it)."""
    text: list[str] = field(default_factory=list)
    error: bool = False
    """An error object came with a 2xx status (some upstreams report failures so)."""

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


class _StreamReader:
    """Follows an SSE stream as it passes, line by line."""

    __slots__ = ("dialect", "tail", "seen")

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.tail = b""
        self.seen = _Seen()

    def feed(self, chunk: bytes) -> None:
        self.tail += chunk
        *lines, self.tail = self.tail.split(b"\n")
        for line in lines:
            self._line(line)

    def end(self) -> None:
        if self.tail:
            self._line(self.tail)
            self.tail = b""

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            return
        try:
            document = json.loads(line[5:], parse_float=Decimal)
        except ValueError:
            return
        if isinstance(document, dict):
            self.seen.observe(self.dialect, document)


def _bill(emitter: Any, call: Call, seen: _Seen, succeeded: bool) -> None:
    """Bill from the upstream's usage; without readable usage, from an estimate — unless the
    request failed, or its 2xx answer was an error with nothing generated."""
    if seen.usage is not None:
        event = usage_event(call, seen.usage)
        if event is not None:
            emitter.submit(event)
            return
    elif not succeeded:
        return  # a failed request is billed only when the upstream reported usage
    text = "".join(seen.text)
    if seen.error and not text:
        return
    emitter.submit_later(lambda: estimated_event(call, text))


def forwarded_headers(request: Request) -> dict[str, str]:
    """The client headers worth passing on (:data:`FORWARDED`, and the fake upstream's
    ``x-fake-*`` knobs, meaningless to a real upstream); never the client's credentials."""
    return {k: v for k, v in request.headers.items() if k in FORWARDED or k.startswith("x-fake-")}


@router.post("/v1/chat/completions")
async def chat_completions(
    request: Request, key: Annotated[TenantKey, Depends(require_tenant)]
) -> Response:
    state = request.app.state
    raw = await request.body()
    body = parse_body(raw)
    if body is None or not isinstance(body.get("model"), str) or not body["model"]:
        return error(400, "body must be a JSON object with a model")
    call = Call(key, OPENAI, body["model"], body, f"req-{uuid.uuid4()}", datetime.now(UTC))
    client: httpx.AsyncClient = state.upstream
    upstream = client.build_request(
        "POST",
        "/chat/completions",
        content=raw,
        headers=forwarded_headers(request) | state.upstream_headers,
    )
    return await forward(request, call, upstream, client, stream=bool(body.get("stream")))
