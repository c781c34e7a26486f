"""The gateway's OpenAPI document, made true: what FastAPI generates, plus what it cannot see.

The JSON routes read their bodies by hand (``bodies.py``, ``ingest.to_event``, ``core``'s
parsers) so FastAPI knows none of them; their shapes are written here, field for field as
those readers check them. Every operation lists the statuses it really answers: the proxy
routes and ``/v1/models`` in the SDKs' error shape (``ProxyError``), every other route in
``Error`` — ``{"error": message, "field": where}`` (``field`` when one input is at fault).
``/metrics`` is Prometheus text; the proxies' streams are server-sent events
(``front.openapi_paths``). ``tests/integration/test_http_fuzz.py`` fuzzes every route from
this document and fails on any answer it does not describe.
"""

from __future__ import annotations

from typing import Any

from services.core.corrections import CORRECTABLE
from services.core.pricing import PRICE_KEYS
from services.core.usage import USAGE_FORMATS, Usage
from services.gateway import front, ingest, proxy

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "What is wrong, for a person to read."},
        "field": {
            "type": "string",
            "description": "The input at fault (a JSON path such as usage.prompt_tokens).",
        },
    },
}
"""The error of every non-proxy route (``errors.py``); a missing price adds ``model`` and
``suggestions``."""

_TEXT = {"type": "string", "minLength": 1, "maxLength": 256}
_TIME = {"type": "string", "format": "date-time", "description": "RFC 3339 with a timezone"}
_MONEY = {
    "type": ["string", "number"],
    "description": "USD, a decimal string (a JSON number is read exactly too)",
}
_COUNT = {"type": "integer", "minimum": 0, "maximum": 10**12 - 1}
_USAGE = {
    "type": "object",
    "description": "Token counts in one of the usage formats (OpenAI / OpenRouter "
    "prompt_tokens..., the Responses API's or Anthropic's input_tokens..., Gemini's "
    "usageMetadata, or the normalised shape); the parts must add up to their totals.",
    "properties": {
        **dict.fromkeys(Usage._fields, _COUNT),
        "input_tokens": _COUNT,
        "output_tokens": _COUNT,
        "promptTokenCount": _COUNT,
        "candidatesTokenCount": _COUNT,
        "thoughtsTokenCount": _COUNT,
        "total_tokens": _COUNT,
        "totalTokenCount": _COUNT,
    },
}
_USAGE_ITEM = {
    "type": "object",
    "required": list(ingest.REQUIRED),
    "additionalProperties": False,
    "properties": {
        "request_id": _TEXT,
        "tenant_id": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,62}$"},
        "api_key_id": {**_TEXT, "type": ["string", "null"]},
        "provider": _TEXT,
        "provider_model_id": _TEXT,
        "occurred_at": {**_TIME, "description": "2000-01-01 .. now + 1 hour; default now"},
        "usage": _USAGE,
        "format": {"type": "string", "enum": list(USAGE_FORMATS)},
        "reported_cost": {**_MONEY, "type": ["string", "number", "null"]},
        "metadata": {
            "type": "object",
            "maxProperties": 64,
            "additionalProperties": {"type": "string", "maxLength": 2048},
        },
        "usage_source": {"type": "string", "enum": ["upstream", "estimated"]},
    },
}
_RESULTS = {
    "type": "object",
    "required": ["accepted", "rejected", "results"],
    "properties": {
        "accepted": {"type": "integer"},
        "rejected": {"type": "integer"},
        "error": {"type": "string", "description": "Only when no item was accepted (422)."},
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "status"],
                "properties": {
                    "index": {"type": "integer"},
                    "status": {"type": "string", "enum": ["accepted", "rejected"]},
                    "request_id": {"type": "string"},
                    "error": {"type": "string"},
                    "field": {"type": ["string", "null"]},
                },
            },
        },
    },
}
_PRICES = dict.fromkeys(PRICE_KEYS, _MONEY)
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/usage"): {
        "description": f"One usage item, or a batch of at most {ingest.MAX_BATCH}.",
        "oneOf": [
            _USAGE_ITEM,
            {"type": "array", "items": _USAGE_ITEM, "maxItems": ingest.MAX_BATCH},
        ],
    },
    ("post", "/internal/billing/quote"): {
        "type": "object",
        "required": ["provider_model_id"],
        "properties": {
            "provider_model_id": _TEXT,
            "usage": _USAGE,
            "format": {"type": "string", "enum": list(USAGE_FORMATS)},
            "pricing": {
                "type": "object",
                "description": "A what-if price (OpenRouter's pricing object), instead of "
                "the price book's",
                "required": ["prompt", "completion"],
                "properties": _PRICES,
            },
            "at": _TIME,
        },
    },
    ("post", "/internal/billing/prices"): {
        "type": "object",
        "required": ["model", "effective_from", "reason", "by"],
        "description": "At least one price; USD per token (per million tokens with "
        "per_million: true).",
        "properties": {
            "model": _TEXT,
            "effective_from": _TIME,
            "reason": {"type": "string", "minLength": 1, "maxLength": 1000},
            "by": {"type": "string", "minLength": 1, "maxLength": 256},
            **dict.fromkeys(CORRECTABLE, _MONEY),
            "per_million": {"type": "boolean"},
            "layer": {"type": "string", "enum": ["override", "catalogue"]},
        },
    },
    ("post", "/internal/billing/credits"): {
        "type": "object",
        "required": ["tenant_id", "amount", "reason"],
        "properties": {
            "tenant_id": _TEXT,
            "amount": _MONEY,
            "reason": {"type": "string", "minLength": 1, "maxLength": 500},
            "idempotency_key": {"type": ["string", "null"], "maxLength": 200},
            "expires_at": {**_TIME, "type": ["string", "null"]},
        },
    },
}
_BUDGET = {
    "type": "object",
    "required": ["monthly_limit"],
    "properties": {
        "monthly_limit": _MONEY,
        "hard": {"type": "boolean", "default": True},
        "alerts": {
            "description": "Whole percentages, 1 to 1000 (default [50, 80, 100])",
            "type": ["array", "string"],
            "items": {"type": "integer", "minimum": 1, "maximum": 1000},
        },
    },
}
BODIES[("put", "/internal/billing/budgets/{tenant_id}")] = _BUDGET
BODIES[("put", "/internal/billing/budgets/{tenant_id}/keys/{key_id}")] = _BUDGET
CHAT_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["model", "messages"],
    "description": "An OpenAI chat completions request, forwarded as it came.",
    "example": {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]},
    "properties": {
        "model": {**_TEXT, "description": "Billed as named: 1-256 characters, no NUL"},
        "messages": {"type": "array", "items": {"type": "object"}},
        "stream": {"type": "boolean"},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "n": {"type": "integer", "minimum": 1},
    },
}
GEMINI_BODY: dict[str, Any] = {
    "type": "object",
    "description": "A Gemini generateContent request, forwarded as it came.",
    "example": {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]},
    "properties": {
        "contents": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "role": {"type": "string"},
                    "parts": {"type": "array", "items": {"type": "object"}},
                },
            },
        },
        "generationConfig": {
            "type": "object",
            "properties": {
                "maxOutputTokens": {"type": "integer", "minimum": 1},
                "candidateCount": {"type": "integer", "minimum": 1},
            },
        },
    },
}

_WHY = {
    400: "The body is not JSON (or nested too deep to read).",
    401: "No credentials, or unknown or revoked ones.",
    403: "The finance token, on a route it may not use.",
    404: "No such resource (tenant, price, invoice, model).",
    408: "The request body did not arrive within the body timeout (connection closed).",
    409: "The idempotency key was used for another grant.",
    413: "The request body is larger than the gateway's limit (connection closed), or a "
    "batch has too many items.",
    422: "A field is missing or invalid (field names it).",
    429: "Too many failed authentications from this address (Retry-After).",
    503: "A dependency (database, broker) is not configured or not reachable now.",
}


def document(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (FastAPI's) with the proxy routes, the request bodies, the errors and the
    content types the routes really have."""
    schema["paths"] = front.openapi_paths() | schema["paths"]
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["ProxyError"] = front.PROXY_ERROR_SCHEMA
    schemas["Error"] = ERROR_SCHEMA
    schemas["UsageResults"] = _RESULTS
    for name in ("HTTPValidationError", "ValidationError"):  # never answered: errors.py
        schemas.pop(name, None)
    components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            _operation(path, method, operation)
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]
    metrics["content"] = {"text/plain": {"schema": {"type": "string"}}}
    return schema


def _operation(path: str, method: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    sdk = path.startswith(proxy.PROXY_PATHS)
    if path == front.CHAT or (sdk and path != "/v1/models/{model_id}" and method == "post"):
        body = CHAT_BODY if path == front.CHAT else GEMINI_BODY
        operation["requestBody"] = _json_body(body)
        statuses = {404, 408, 413, 429} if path != front.CHAT else {408, 413, 429}
    else:
        statuses = _statuses(path, method)
        if (method, path) in BODIES:
            operation["requestBody"] = _json_body(BODIES[(method, path)])
            statuses |= {400, 408, 413, 422}
    if statuses & {401, 403}:
        operation["security"] = [{"bearer": []}]
    ref = "#/components/schemas/" + ("ProxyError" if sdk else "Error")
    for number in sorted(statuses):
        responses.setdefault(str(number), {"description": _WHY[number]})
    for status, response in responses.items():
        if status.startswith(("4", "5")):
            response["content"] = {"application/json": {"schema": {"$ref": ref}}}
    if method == "post" and path in ("/internal/billing/prices", "/internal/billing/credits"):
        responses["200"] = {
            "description": "Already so (the same price, or the same idempotent grant): "
            "nothing new was recorded.",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    if path == "/readyz":  # starting: the same document, status "starting"
        responses["503"]["content"] = responses["200"]["content"]
    if path == "/v1/usage":
        results = {"application/json": {"schema": {"$ref": "#/components/schemas/UsageResults"}}}
        responses["202"]["content"] = results
        responses["422"] = {"description": "No item was accepted.", "content": results}


def _statuses(path: str, method: str) -> set[int]:
    statuses: set[int] = set()
    if path.startswith("/internal/") or path == "/v1/usage":
        statuses |= {401, 403, 429}
    if path.startswith(("/v1/billing/", "/v1/models")):
        statuses |= {401, 429, 503}
    if "{" in path or path in (
        "/internal/billing/prices/history",
        "/internal/billing/quote",
        "/internal/billing/credits",
    ):
        statuses.add(404)
    if path.startswith("/internal/billing/") and path != "/internal/billing/quote":
        statuses.add(503)  # no database configured
    if path in ("/v1/usage", "/readyz"):
        statuses.add(503)
    if path == "/internal/billing/credits":
        statuses.add(409)
    if path.startswith(("/internal/", "/v1/")) and method == "get" and path != "/v1/models":
        statuses.add(422)
    return statuses


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}
