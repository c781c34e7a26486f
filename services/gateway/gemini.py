"""The Gemini-native proxy: ``POST .../models/{model}:generateContent`` and
``:streamGenerateContent?alt=sse``, billed from ``usageMetadata`` as ``google/{model}``.

Served on every path Google's ``google-genai`` SDK sends to a ``base_url`` (:data:`PATH`):

- the Gemini API: ``/v1/models/...`` (the SDK's default) and ``/v1beta/models/...``;
- Vertex AI with a project (``vertexai=True``, credentials whose token is the tenant key):
  ``/{v1,v1beta1}/projects/{project}/locations/{location}/publishers/google/models/...``;
- Vertex AI express mode (``vertexai=True`` with an API key):
  ``/{v1,v1beta1}/publishers/google/models/...``.

The client's API version, project and location only pick the route: they are not
forwarded, and all of these are billed alike and sent to the one upstream below.

The routes are matched by :func:`route` (``front.py`` serves them); the request goes through
the shared forwarder (:func:`services.gateway.proxy.forward`) with
the :data:`GEMINI` dialect. Where it goes, and with which of the gateway's credentials, is
decided once from the settings by :func:`services.gateway.gemini_target.gemini_target`;
the first case that applies wins:

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
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from services.core.usage import Usage
from services.gateway.auth import gemini_key, tenant_of
from services.gateway.capture import Call, Dialect, model_problem, positive_int
from services.gateway.proxy import Incoming, Reply, error, forward, forwarded_headers, parse_body
from services.gateway.resources import Resources

ACTIONS = frozenset({"generateContent", "streamGenerateContent"})
PATH = re.compile(
    r"/(?:v1|v1beta)/models/(?P<gemini>.+)"
    r"|/(?:v1|v1beta1)/(?:projects/[^/]+/locations/[^/]+/)?publishers/google/models/(?P<vertex>.+)",
    re.DOTALL,  # a path with a newline (%0A) is the route's too: 404 unknown action, not 405
)
"""The paths served (see the module docstring), ending in ``{model}:{action}``. Other
publishers' models and tuned-model endpoints are not among them: they stay 404."""
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def route(path: str) -> str | None:
    """The ``{model}:{action}`` part of a Gemini route's path, or ``None``."""
    match = PATH.fullmatch(path)
    return None if match is None else match["gemini"] or match["vertex"]


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


def _prompt_tokens(model: str, body: Mapping[str, Any]) -> int:
    from services.gateway.tokens import gemini_prompt_tokens

    return gemini_prompt_tokens(model, body)


def _max_output(body: Mapping[str, Any]) -> tuple[int | None, int]:
    """``generationConfig.maxOutputTokens``; ``candidateCount`` choices."""
    config = body.get("generationConfig") or body.get("generation_config")
    if not isinstance(config, Mapping):
        return None, 1
    limit = positive_int(config.get("maxOutputTokens") or config.get("max_output_tokens"))
    count = config.get("candidateCount") or config.get("candidate_count")
    return limit, positive_int(count) or 1


GEMINI = Dialect(
    provider="vertex",
    usage_format="gemini",
    route="/v1beta/models/{model}:{action}",
    usage_of=_usage,
    text_of=_text,
    estimate=_estimate,
    prompt_tokens=_prompt_tokens,
    max_output=_max_output,
)
_DIALECTS = {"vertex": GEMINI, "google-ai-studio": replace(GEMINI, provider="google-ai-studio")}


async def generate_content(resources: Resources, incoming: Incoming, model_action: str) -> Reply:
    key = await tenant_of(resources, gemini_key(incoming.headers), gemini=True)
    model, _, action = model_action.rpartition(":")
    model = model.removeprefix("models/")
    if action not in ACTIONS:
        return error(
            404, f"unknown action {action!r}: use generateContent or streamGenerateContent"
        )
    if not _MODEL.fullmatch(model):
        return error(400, f"invalid model name {model!r:.80}")
    problem = model_problem(f"google/{model}")  # what cannot be billed is not forwarded
    if problem is not None:
        return error(400, problem)
    stream = action == "streamGenerateContent"
    if stream and parse_qs(incoming.query).get("alt", [""])[-1] != "sse":
        return error(400, "streamGenerateContent is proxied as server-sent events: add ?alt=sse")
    raw = await incoming.read_body()
    body = parse_body(raw)
    if body is None:
        return error(400, "body must be a JSON object")
    target = resources.gemini_target
    if target is None:
        return error(
            503,
            "no Gemini upstream is configured (VERTEX_BASE_URL, VERTEX_PROJECT or VERTEX_API_KEY)",
        )
    dialect = _DIALECTS[target.provider]
    call = Call(key, dialect, f"google/{model}", body, f"req-{uuid.uuid4()}", datetime.now(UTC))
    url = target.url(model, action) + ("?alt=sse" if stream else "")
    headers = forwarded_headers(incoming.headers) | dict(target.headers)
    return await forward(
        resources, call, resources.gemini_upstream, url, headers, raw, stream=stream
    )
