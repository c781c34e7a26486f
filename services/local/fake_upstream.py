"""A fake LLM upstream for tests and benchmarks: a real HTTP server on loopback.

It speaks OpenRouter's chat completions (JSON and SSE, with ``usage`` including ``cost``,
``cost_details`` and ``is_byok``, as OpenRouter always sends it) and Gemini's
``generateContent`` / ``streamGenerateContent?alt=sse`` (with ``usageMetadata``, thoughts
outside candidates), and serves ``GET /api/v1/models``, the catalogue of the models it
prices, so a gateway pointed at it (``OPENROUTER_BASE_URL``) syncs its prices cleanly.
Token counts are derived from the request, deterministically; the reported cost is computed
with the project's own price list, so a correct biller finds zero drift.

Knobs, per request as headers (or for every request through ``FakeConfig``):
``x-fake-latency-ms`` (delay before the first byte), ``x-fake-status`` (answer this HTTP
error instead), ``x-fake-cut-after`` (end a stream after this many content chunks, without
usage: a cut connection), ``x-fake-completion-tokens`` (length of the answer),
``x-fake-reasoning-tokens``, ``x-fake-cached-tokens``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from services.core.catalogue import Catalogue, apply_catalogue, default_catalogue
from services.core.errors import BillingError
from services.core.pricebook import InMemoryPriceBook
from services.core.quote import quote


class RawNumber(str):
    """A decimal string to be written into JSON as a bare number (see ``dumps``)."""


def dumps(document: Any) -> str:
    """JSON with every ``RawNumber`` written as a number, never through a binary float."""
    raw: list[str] = []

    def mark(value: Any) -> Any:
        if isinstance(value, RawNumber):
            raw.append(str(value))
            return f"\x00raw{len(raw) - 1}\x00"
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = json.dumps(mark(document))
    for index, number in enumerate(raw):
        text = text.replace(f'"\\u0000raw{index}\\u0000"', number)
    return text


def _json(document: Any, status_code: int = 200) -> Response:
    return Response(dumps(document), status_code=status_code, media_type="application/json")


WORDS = ("billing", "tokens", "stream", "cache", "price", "event", "ledger", "usage")


@dataclass(frozen=True, slots=True)
class FakeConfig:
    latency_ms: int = 0
    completion_tokens: int = 24
    reasoning_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Plan:
    """What one fake response will contain."""

    prompt: int
    completion: int
    reasoning: int
    cached: int
    latency_ms: int
    status: int | None
    cut_after: int | None


def _int(headers: Any, name: str, default: int) -> int:
    value = headers.get(name)
    return int(value) if value is not None and value.isascii() and value.isdigit() else default


def _plan(request: Request, body: dict[str, Any], prompt_text: str, config: FakeConfig) -> Plan:
    h = request.headers
    prompt = max(1, len(prompt_text) // 4 + 4 * len(body.get("messages", [])))
    completion = max(1, _int(h, "x-fake-completion-tokens", config.completion_tokens))
    # Like a real model, never more than the request's output limit.
    generation = body.get("generationConfig")
    for limit in (
        body.get("max_completion_tokens"),
        body.get("max_tokens"),
        generation.get("maxOutputTokens") if isinstance(generation, dict) else None,
    ):
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            completion = min(completion, limit)
            break
    reasoning = min(_int(h, "x-fake-reasoning-tokens", config.reasoning_tokens), completion - 1)
    status = _int(h, "x-fake-status", 0) or None
    cut = h.get("x-fake-cut-after")
    return Plan(
        prompt=prompt,
        completion=completion,
        reasoning=max(0, reasoning),
        cached=min(_int(h, "x-fake-cached-tokens", config.cached_tokens), prompt),
        latency_ms=_int(h, "x-fake-latency-ms", config.latency_ms),
        status=status,
        cut_after=int(cut) if cut is not None and cut.isascii() and cut.isdigit() else None,
    )


def _invalid(message: str) -> Response:
    """400 as both real APIs answer a malformed request (OpenAI's and Google's fields)."""
    error = {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}
    return JSONResponse({"error": error | {"type": "invalid_request_error"}}, status_code=400)


def _objects(value: Any) -> bool:
    """``value`` is a JSON array of objects (messages, contents, parts)."""
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def _chat_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if not _objects(body.get("messages", [])):
        return "messages must be an array of message objects"
    return None


def _gemini_problem(body: Any) -> str | None:
    """Like Gemini's own 400 INVALID_ARGUMENT: a content or a part that is not an object
    (a bare string part, say) is refused, not answered."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    contents = body.get("contents", [])
    if not _objects(contents):
        return "contents must be an array of Content objects"
    for index, content in enumerate(contents):
        if not _objects(content.get("parts", [])):
            return f"contents[{index}].parts must be an array of Part objects"
    return None


def _text(tokens: int) -> list[str]:
    """One word per token (the fake's tokenizer is simple and deterministic)."""
    return [WORDS[i % len(WORDS)] + " " for i in range(tokens)]


def model_catalogue(catalogue: Catalogue) -> dict[str, Any]:
    """The models the fake prices, as OpenRouter's ``GET /api/v1/models`` lists them (prices
    as decimal strings per token): a gateway syncing from the fake finds the prices it bills
    with, unchanged."""
    data = []
    for entry in catalogue.entries:
        row: dict[str, Any] = {"id": entry.model, "name": entry.name or entry.model}
        if entry.canonical_slug:
            row["canonical_slug"] = entry.canonical_slug
        data.append(row | {"pricing": entry.pricing.to_json()})
    return {"data": data}


def create_fake_upstream(config: FakeConfig | None = None) -> FastAPI:
    config = config or FakeConfig()
    catalogue = default_catalogue()
    book = InMemoryPriceBook()
    apply_catalogue(book, catalogue, observed_at=datetime.now(UTC), source="snapshot")
    models = model_catalogue(catalogue)
    app = FastAPI(title="fake LLM upstream")

    def openrouter_usage(model: str, plan: Plan) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": plan.prompt,
            "completion_tokens": plan.completion,
            "total_tokens": plan.prompt + plan.completion,
            "prompt_tokens_details": {"cached_tokens": plan.cached, "cache_write_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": plan.reasoning},
            "is_byok": False,
        }
        try:
            priced = quote({"provider_model_id": model, "usage": usage}, book)
        except BillingError:  # PriceNotFound above all
            return usage  # a model the price list does not know: usage without a cost
        # OpenRouter sends the cost as a JSON number: written as one, digit for digit.
        usage["cost"] = RawNumber(priced["breakdown"]["total_cost"])
        usage["cost_details"] = {"upstream_inference_cost": None}
        return usage

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/v1/models")
    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return models

    @app.post("/api/v1/chat/completions")
    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        if problem := _chat_problem(body):
            return _invalid(problem)
        model = str(body.get("model", "openai/gpt-4o-mini"))
        prompt_text = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        plan = _plan(request, body, prompt_text, config)
        await asyncio.sleep(plan.latency_ms / 1000)
        if plan.status:
            return JSONResponse(
                {"error": {"code": plan.status, "message": "fake upstream error"}},
                status_code=plan.status,
            )
        created = int(time.time())
        ident = f"gen-fake-{time.time_ns()}"
        words = _text(plan.completion)
        if not body.get("stream"):
            return _json(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "provider": "Fake",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(words)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": openrouter_usage(model, plan),
                }
            )

        async def events() -> AsyncIterator[bytes]:
            base = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
            }
            for index, word in enumerate(words):
                if plan.cut_after is not None and index >= plan.cut_after:
                    return  # the connection drops: no final chunk, no usage
                delta = {"role": "assistant", "content": word} if index == 0 else {"content": word}
                chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                yield f"data: {dumps(chunk)}\n\n".encode()
            final = {
                **base,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": openrouter_usage(model, plan),
            }
            yield f"data: {dumps(final)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1beta/models/{model_action}")
    async def gemini(model_action: str, request: Request) -> Response:
        model, _, action = model_action.partition(":")
        body = await request.json()
        if problem := _gemini_problem(body):
            return _invalid(problem)
        texts = [
            str(part.get("text", ""))
            for content in body.get("contents", [])
            for part in content.get("parts", [])
        ]
        plan = _plan(request, {"messages": body.get("contents", [])}, " ".join(texts), config)
        await asyncio.sleep(plan.latency_ms / 1000)
        if plan.status:
            return JSONResponse({"error": {"code": plan.status}}, status_code=plan.status)
        candidates = plan.completion - plan.reasoning  # thoughts are NOT inside candidates
        usage = {
            "promptTokenCount": plan.prompt,
            "cachedContentTokenCount": plan.cached,
            "candidatesTokenCount": candidates,
            "thoughtsTokenCount": plan.reasoning,
            "totalTokenCount": plan.prompt + candidates + plan.reasoning,
            "trafficType": "ON_DEMAND",
        }
        words = _text(candidates)
        if action == "generateContent":
            return JSONResponse(
                {
                    "candidates": [
                        {"content": {"role": "model", "parts": [{"text": "".join(words)}]}}
                    ],
                    "usageMetadata": usage,
                    "modelVersion": model,
                }
            )
        if action != "streamGenerateContent":
            return JSONResponse({"error": {"code": 404}}, status_code=404)

        async def events() -> AsyncIterator[bytes]:
            for index, word in enumerate(words):
                if plan.cut_after is not None and index >= plan.cut_after:
                    return
                chunk: dict[str, Any] = {
                    "candidates": [{"content": {"role": "model", "parts": [{"text": word}]}}],
                    "usageMetadata": {"trafficType": "ON_DEMAND"},  # counts only at the end
                }
                if index == len(words) - 1:
                    chunk["usageMetadata"] = usage
                yield f"data: {json.dumps(chunk)}\r\n\r\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
