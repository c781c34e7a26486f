"""The OpenAI-compatible proxy: forward to OpenRouter, pass the answer through, bill it.

``POST /v1/chat/completions`` authenticates the tenant's API key (401 without contacting the
upstream), forwards the body with the gateway's own OpenRouter key, and passes the answer
back — a stream chunk by chunk, never buffered whole. Usage comes from the JSON body or
the final SSE chunk (OpenRouter always sends it, with its ``cost``); the ``UsageRecorded``
goes to the emitter after the response, off the request path. An upstream error is passed
through with its status and billed only if it carries usage.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from services.core.errors import BillingError
from services.core.events import ReportedCharge, UsageCounts, UsageRecorded
from services.core.usage import parse_usage
from services.gateway.auth import TenantKey, require_tenant

log = logging.getLogger("billing.proxy")
router = APIRouter()

HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "content-encoding"}


def usage_event(
    key: TenantKey, model: str, usage: Any, request_id: str, occurred_at: datetime
) -> UsageRecorded | None:
    """The fact to bill, or ``None`` (logged) when the usage cannot be read."""
    try:
        parsed = parse_usage({"usage": usage}, "openai")
    except BillingError as exc:
        log.error("unbillable usage from upstream for %s: %s", request_id, exc)
        return None
    return UsageRecorded(
        request_id=request_id,
        tenant_id=key.tenant_id,
        api_key_id=key.key_id,
        provider="openrouter",
        provider_model_id=model,
        occurred_at=occurred_at,
        recorded_at=datetime.now(UTC),
        usage=UsageCounts.of(parsed.usage),
        usage_source="upstream",
        usage_format=parsed.format,
        reported=ReportedCharge.of(parsed.reported),
        metadata={"route": "/v1/chat/completions"},
    )


@router.post("/v1/chat/completions")
async def chat_completions(
    request: Request, key: Annotated[TenantKey, Depends(require_tenant)]
) -> Response:
    state = request.app.state
    raw = await request.body()
    try:
        body = json.loads(raw)
        model = str(body["model"])
    except (ValueError, KeyError, TypeError):
        return Response(
            b'{"error": {"message": "body must be JSON with a model"}}',
            status_code=400,
            media_type="application/json",
        )
    started = datetime.now(UTC)
    request_id = f"req-{uuid.uuid4()}"
    client: httpx.AsyncClient = state.upstream
    upstream = client.build_request(
        "POST",
        "/chat/completions",
        content=raw,
        headers=_forwarded(request) | state.upstream_headers,
    )
    response = await client.send(upstream, stream=True)
    headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}
    headers["x-billing-request-id"] = request_id

    if not body.get("stream"):
        content = await response.aread()
        await response.aclose()
        await _bill_body(state, key, model, content, request_id, started)
        return Response(content, status_code=response.status_code, headers=headers)

    async def relay() -> AsyncIterator[bytes]:
        tail = b""
        usage: Any = None
        try:
            async for chunk in response.aiter_raw():
                yield chunk
                tail += chunk
                *lines, tail = tail.split(b"\n")
                for line in lines:
                    usage = _usage_of_line(line) or usage
        finally:
            await response.aclose()
            if tail:
                usage = _usage_of_line(tail) or usage
            if usage is not None:
                event = usage_event(key, model, usage, request_id, started)
                if event is not None:
                    await state.emitter.emit(event)

    return StreamingResponse(relay(), status_code=response.status_code, headers=headers)


def _forwarded(request: Request) -> dict[str, str]:
    """Client headers worth passing on: OpenRouter's attribution (``HTTP-Referer``,
    ``X-Title``) and other ``x-`` headers; never the client's credentials."""
    return {
        k: v
        for k, v in request.headers.items()
        if (k.startswith("x-") and not k.startswith("x-billing-")) or k == "http-referer"
    }


def _usage_of_line(line: bytes) -> Any:
    line = line.strip()
    if not line.startswith(b"data:") or line == b"data: [DONE]":
        return None
    try:
        chunk = json.loads(line[5:], parse_float=Decimal)
    except ValueError:
        return None
    return chunk.get("usage") if isinstance(chunk, dict) else None


async def _bill_body(
    state: Any, key: TenantKey, model: str, content: bytes, request_id: str, started: datetime
) -> None:
    try:
        answer = json.loads(content, parse_float=Decimal)
    except ValueError:
        return  # not JSON (an upstream error page): nothing to bill
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if usage is None:
        return  # failed requests are billed only when the upstream reported usage
    event = usage_event(key, model, usage, request_id, started)
    if event is not None:
        await state.emitter.emit(event)
