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

What an answer carried and the event it becomes are in ``capture.py``.
"""

from __future__ import annotations

import json
import logging
import uuid
import weakref
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

import anyio
import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from services.adapters import metrics
from services.gateway.auth import require_tenant
from services.gateway.capture import OPENAI, Call, Seen, StreamReader, bill
from services.gateway.keys import TenantKey
from services.gateway.resources import Deps, Resources, resources_of

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


PROXY_PATHS = (
    "/v1/chat/",
    "/v1/models",
    "/v1beta/",
    "/v1beta1/",
    "/v1/projects/",
    "/v1/publishers/",
)
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


async def forward(
    request: Request,
    call: Call,
    upstream: httpx.Request,
    client: httpx.AsyncClient,
    *,
    stream: bool,
) -> Response:
    """Send ``upstream``, pass its answer back and bill it through the emitter."""
    resources = resources_of(request)
    if not resources.emitter.accepting:
        metrics.PROXY_REFUSED.labels(reason="spool").inc()
        return error(503, "usage spool is full; try again later", {"retry-after": "5"})
    in_flight = resources.in_flight
    if not in_flight.enter():
        metrics.PROXY_REFUSED.labels(reason="overload").inc()
        return error(503, "the gateway is at capacity; try again shortly", {"retry-after": "1"})
    try:
        response = await _send(resources, call, upstream, client, stream=stream)
    except BaseException:
        in_flight.leave()
        raise
    if isinstance(response, StreamingResponse):
        # Served until the stream is done with, however it ends (finished, client gone,
        # never started): when its body iterator is freed.
        weakref.finalize(response.body_iterator, in_flight.leave)
    else:
        in_flight.leave()
    return response


async def _send(
    resources: Resources,
    call: Call,
    upstream: httpx.Request,
    client: httpx.AsyncClient,
    *,
    stream: bool,
) -> Response:
    emitter = resources.emitter
    try:
        response = await _open(resources, call, upstream, client)
    except httpx.TimeoutException:
        return error(504, "upstream timed out")
    except httpx.TransportError as exc:
        log.warning("upstream unreachable for %s: %r", call.request_id, exc)
        return error(502, "upstream unreachable")
    headers = {k: v for k, v in response.headers.items() if k.lower() not in NOT_RELAYED}
    headers["x-billing-request-id"] = call.request_id
    succeeded = response.is_success
    billing = resources.settings.emit_usage

    if not stream:
        try:
            content = await response.aread()
        except httpx.HTTPError as exc:  # the answer broke off after its status line
            log.warning("upstream answer cut for %s: %r", call.request_id, exc)
            if billing and succeeded:
                bill(emitter, call, Seen(), succeeded)  # the prompt was processed
            timed_out = isinstance(exc, httpx.TimeoutException)
            return error(504 if timed_out else 502, "the upstream's answer broke off")
        finally:
            await response.aclose()
        if billing:
            seen = Seen()
            try:
                answer = json.loads(content, parse_float=Decimal)
            except ValueError:
                answer = None  # not JSON (an upstream error page)
            if isinstance(answer, dict):
                seen.observe(call.dialect, answer)
            bill(emitter, call, seen, succeeded)
        return Response(content, status_code=response.status_code, headers=headers)

    async def relay() -> AsyncIterator[bytes]:
        reader = StreamReader(call.dialect)
        try:
            async for chunk in response.aiter_bytes():  # decoded, as it arrives
                reader.feed(chunk)
                yield chunk
        finally:
            reader.end()
            # Billing first and without awaiting: a client that went away cancels this
            # generator, and any further await would be cancelled with it.
            if billing:
                bill(emitter, call, reader.seen, succeeded)
            with anyio.CancelScope(shield=True):
                await response.aclose()

    return StreamingResponse(relay(), status_code=response.status_code, headers=headers)


class _Connection:
    """Whether a request went out on a connection the pool already had (httpcore's trace)."""

    __slots__ = ("opened", "used")

    def __init__(self) -> None:
        self.opened = self.used = False

    async def trace(self, event: str, _: object) -> None:
        if event.startswith("connection.connect_tcp"):
            self.opened = True
        elif event.startswith("http11.send_request_headers"):
            self.used = True

    @property
    def reused(self) -> bool:
        return self.used and not self.opened


STALE = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
"""How a pooled connection the upstream has closed fails before any byte of an answer."""


async def _open(
    resources: Resources, call: Call, upstream: httpx.Request, client: httpx.AsyncClient
) -> httpx.Response:
    """Send ``upstream`` and wait for the answer's head. A reused keep-alive connection that
    fails before any byte of the answer (the upstream closed it while idle: the request never
    reached the model) is retried once on a new connection; a connect error or a failure
    after the answer began is not."""
    connection = _Connection()
    upstream.extensions["trace"] = connection.trace
    try:
        return await client.send(upstream, stream=True)
    except STALE as exc:
        if not connection.reused:
            raise
        log.info("retrying %s on a new connection: %r", call.request_id, exc)
    metrics.PROXY_RETRIED.inc()
    del upstream.extensions["trace"]
    return await resources.fresh_upstream.send(upstream, stream=True)


def forwarded_headers(request: Request) -> dict[str, str]:
    """The client headers worth passing on (:data:`FORWARDED`, and the fake upstream's
    ``x-fake-*`` knobs, meaningless to a real upstream); never the client's credentials."""
    return {k: v for k, v in request.headers.items() if k in FORWARDED or k.startswith("x-fake-")}


@router.post("/v1/chat/completions")
async def chat_completions(
    request: Request, key: Annotated[TenantKey, Depends(require_tenant)], resources: Deps
) -> Response:
    raw = await request.body()
    body = parse_body(raw)
    if body is None or not isinstance(body.get("model"), str) or not body["model"]:
        return error(400, "body must be a JSON object with a model")
    call = Call(key, OPENAI, body["model"], body, f"req-{uuid.uuid4()}", datetime.now(UTC))
    client = resources.upstream
    upstream = client.build_request(
        "POST",
        "/chat/completions",
        content=raw,
        headers=forwarded_headers(request) | resources.upstream_headers,
    )
    return await forward(request, call, upstream, client, stream=bool(body.get("stream")))
