"""The Gemini-native proxy: ``POST /v1beta/models/{model}:generateContent`` and
``:streamGenerateContent?alt=sse``, billed from ``usageMetadata`` as ``google/{model}``.

The request goes through the shared forwarder (:func:`services.gateway.proxy.forward`) with
the :data:`GEMINI` dialect. Where it goes, and with which of the gateway's credentials, is
decided once from the settings by :func:`gemini_target`; the first case that applies wins:

1. ``VERTEX_BASE_URL`` set → ``{base}/v1beta/models/{model}:{action}``, the Gemini API's
   shape (Google's is ``https://generativelanguage.googleapis.com``; the fake upstream
   serves it too), with ``VERTEX_API_KEY``, when set, as ``x-goog-api-key``. Billed with
   provider ``google-ai-studio``.
2. ``VERTEX_PROJECT`` set → Vertex AI in the region ``VERTEX_REGION`` (``us-central1`` by
   default): ``https://{region}-aiplatform.googleapis.com/v1/projects/{project}/locations/
   {region}/publishers/google/models/{model}:{action}`` (the region ``global`` uses the host
   ``aiplatform.googleapis.com``), with ``VERTEX_API_KEY`` as ``Authorization: Bearer``: an
   OAuth access token (``gcloud auth print-access-token``), which expires — the gateway
   does not mint tokens. Provider ``vertex``.
3. only ``VERTEX_API_KEY`` set → Vertex AI express mode:
   ``https://aiplatform.googleapis.com/v1/publishers/google/models/{model}:{action}``, the
   key as ``x-goog-api-key``. Provider ``vertex``.
4. nothing set → the route answers 503 without sending anything.

``streamGenerateContent`` is always sent with ``alt=sse``. The client's own credentials
(``Authorization``, ``x-goog-api-key``, a ``key`` query parameter) and its
``x-goog-user-project`` (which would bill another Google project) never go upstream.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from services.adapters.settings import Settings
from services.core.usage import Usage
from services.gateway.auth import TenantKey, require_gemini_tenant
from services.gateway.proxy import Call, Dialect, error, forward, forwarded_headers, parse_body

router = APIRouter()

ACTIONS = frozenset({"generateContent", "streamGenerateContent"})
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True, slots=True)
class GeminiTarget:
    """Where the gateway sends Gemini requests, and with which of its own credentials."""

    models_url: str
    """Everything before ``/{model}:{action}``."""
    headers: Mapping[str, str]
    provider: str
    """What the billed event names as the provider: ``google-ai-studio`` or ``vertex``."""

    def url(self, model: str, action: str) -> str:
        return f"{self.models_url}/{model}:{action}"


def gemini_target(settings: Settings) -> GeminiTarget | None:
    """The upstream the settings name (see the module docstring), or ``None`` if none."""
    secret = settings.vertex_api_key
    key = secret.get_secret_value() if secret else None
    json_only = {"content-type": "application/json"}
    if settings.vertex_base_url:
        return GeminiTarget(
            settings.vertex_base_url.rstrip("/") + "/v1beta/models",
            json_only | ({"x-goog-api-key": key} if key else {}),
            "google-ai-studio",
        )
    if settings.vertex_project:
        region = quote(settings.vertex_region, safe="")
        project = quote(settings.vertex_project, safe="")
        host = ("" if region == "global" else f"{region}-") + "aiplatform.googleapis.com"
        return GeminiTarget(
            f"https://{host}/v1/projects/{project}/locations/{region}/publishers/google/models",
            json_only | ({"authorization": f"Bearer {key}"} if key else {}),
            "vertex",
        )
    if key:
        return GeminiTarget(
            "https://aiplatform.googleapis.com/v1/publishers/google/models",
            json_only | {"x-goog-api-key": key},
            "vertex",
        )
    return None


def _usage(document: Mapping[str, Any]) -> Any:
    # Streamed chunks carry a usageMetadata without counts until the last one (or running
    # totals): only one with counts is usage, and the reader keeps the last such one.
    usage = document.get("usageMetadata")
    return usage if isinstance(usage, Mapping) and "promptTokenCount" in usage else None


def _text(document: Mapping[str, Any]) -> str:
    """Every text part of every candidate, thought summaries included (billed as output)."""
    texts: list[str] = []
    for candidate in document.get("candidates") or ():
        content = candidate.get("content") if isinstance(candidate, Mapping) else None
        if not isinstance(content, Mapping):
            continue
        for part in content.get("parts") or ():
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
    return "".join(texts)


def _estimate(model: str, body: Mapping[str, Any], text: str) -> Usage:
    from services.gateway.tokens import estimate_usage

    return estimate_usage(model, body, text, gemini=True)


GEMINI = Dialect(
    provider="vertex",
    usage_format="gemini",
    route="/v1beta/models/{model}:{action}",
    usage_of=_usage,
    text_of=_text,
    estimate=_estimate,
)
_DIALECTS = {"vertex": GEMINI, "google-ai-studio": replace(GEMINI, provider="google-ai-studio")}


@router.post("/v1beta/models/{model_action:path}")
async def generate_content(
    request: Request,
    model_action: str,
    key: Annotated[TenantKey, Depends(require_gemini_tenant)],
) -> Response:
    model, _, action = model_action.rpartition(":")
    model = model.removeprefix("models/")
    if action not in ACTIONS:
        return error(
            404, f"unknown action {action!r}: use generateContent or streamGenerateContent"
        )
    if not _MODEL.fullmatch(model):
        return error(400, f"invalid model name {model!r}")
    stream = action == "streamGenerateContent"
    if stream and request.query_params.get("alt") != "sse":
        return error(400, "streamGenerateContent is proxied as server-sent events: add ?alt=sse")
    raw = await request.body()
    body = parse_body(raw)
    if body is None:
        return error(400, "body must be a JSON object")
    target: GeminiTarget | None = request.app.state.gemini_target
    if target is None:
        return error(
            503,
            "no Gemini upstream is configured (VERTEX_BASE_URL, VERTEX_PROJECT or VERTEX_API_KEY)",
        )
    dialect = _DIALECTS[target.provider]
    call = Call(key, dialect, f"google/{model}", body, f"req-{uuid.uuid4()}", datetime.now(UTC))
    client: httpx.AsyncClient = request.app.state.gemini_upstream
    headers = forwarded_headers(request)
    upstream = client.build_request(
        "POST",
        target.url(model, action),
        params={"alt": "sse"} if stream else None,
        content=raw,
        headers=headers | dict(target.headers),
    )
    return await forward(request, call, upstream, client, stream=stream)
