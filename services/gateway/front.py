"""The gateway's front door: the proxy routes served as raw ASGI, everything else by FastAPI.

The gateway's app (``app.Gateway``, FastAPI's subclass) asks :func:`route_of` first: a
``POST`` to ``/v1/chat/completions`` or to a Gemini route (``gemini.route``) is read by
:func:`serve` into a ``proxy.Incoming``, handed to its route function and its ``proxy.Reply``
written back; any other request goes to FastAPI untouched. FastAPI's request, dependency and
response machinery was about a quarter of the CPU of a proxied request (py-spy,
``bench/gateway.py --cpu-only``), on the one route where it buys nothing: the body is passed
on as it came.

Errors take the SDKs' shape (``proxy.error``): 401 (``auth.Unauthorized``), 402 (not enough
credit or budget: ``admission.py``), 429 (too many failed authentications from the client's
address), 405 for another method on the chat route, and a logged
500 for anything unexpected, never a traceback. A
client that leaves while sending its body gets nothing and nothing is forwarded. A streamed
answer is relayed chunk by chunk while a watcher waits for the client to leave; if it does,
the relay stops, the upstream connection is closed and what was seen is billed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from services.gateway import gemini, proxy
from services.gateway.auth import (
    Unauthorized,
    client_address,
    count_failure,
    gemini_key,
    refuse_if_limited,
)
from services.gateway.limits import BodyRefused
from services.gateway.proxy import ClientGone, Incoming, Relay, Reply
from services.gateway.resources import Resources
from services.gateway.upstream import UpstreamError

log = logging.getLogger("billing.proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Route = Callable[[Resources, Incoming], Awaitable[Reply]]

CHAT = "/v1/chat/completions"


async def serve(
    route: Route, resources: Resources, scope: Scope, receive: Receive, send: Send
) -> None:
    """Answer one request to a proxy route (:func:`route_of`)."""
    incoming = Incoming(
        scope["path"],
        scope.get("query_string", b"").decode("latin-1"),
        {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
        lambda: _body(receive),
    )
    client = client_address(scope)
    try:
        # 429 after too many failed authentications (a key known to be valid still passes)
        refuse_if_limited(resources, client, gemini_key(incoming.headers))
        reply = await route(resources, incoming)
    except Unauthorized as exc:
        count_failure(resources, client, exc)
        reply = proxy.error(exc.status, exc.message, exc.headers)
    except ClientGone:
        log.info("client left during its request to %s", incoming.path)
        return
    except BodyRefused as exc:  # too large or too slow (limits.py): nothing was forwarded
        reply = proxy.error(exc.status_code, exc.detail, exc.headers)
    except Exception:
        log.exception("unhandled error on POST %s", incoming.path)
        reply = proxy.error(500, "internal error")
    await respond(reply, send, receive)


def route_of(scope: Scope) -> Route | None:
    """The proxy route serving an HTTP request, or ``None`` for FastAPI's routes."""
    path: str = scope["path"]
    if path == CHAT:
        return proxy.chat_completions if scope["method"] == "POST" else _not_allowed
    model_action = gemini.route(path)
    if model_action is None:
        return None
    if scope["method"] != "POST":
        # GET /v1/models/{id} is FastAPI's (the models route); the other Gemini paths are
        # POST only.
        return None if path.startswith("/v1/models/") else _not_allowed

    async def generate(resources: Resources, incoming: Incoming) -> Reply:
        return await gemini.generate_content(resources, incoming, model_action)

    return generate


async def _not_allowed(_: Resources, incoming: Incoming) -> Reply:
    return proxy.error(405, f"only POST is allowed on {incoming.path}", {"allow": "POST"})


async def _body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def respond(reply: Reply, send: Send, receive: Receive) -> None:
    """Write ``reply`` to the client: whole, or relayed as it streams."""
    if reply.relay is None:
        await _whole(send, reply)
    else:
        await _stream(send, receive, reply, reply.relay)


async def _whole(send: Send, reply: Reply) -> None:
    headers = [*reply.headers, (b"content-length", str(len(reply.body)).encode())]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


async def _stream(send: Send, receive: Receive, reply: Reply, relay: Relay) -> None:
    """Relay the stream; stop when the client leaves (the server says so through
    ``receive``), and end the relay (billing it) however the stream ends."""
    task = asyncio.current_task()
    assert task is not None  # noqa: S101  # an ASGI app runs in a task
    state = {"relaying": True, "gone": False}

    async def watch() -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a server that cannot say: the stream just runs to its end
            return
        if state["relaying"]:
            state["gone"] = True
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        start = {"type": "http.response.start", "status": reply.status, "headers": reply.headers}
        await send(start)
        async for chunk in relay.chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        state["relaying"] = False
        await send({"type": "http.response.body", "body": b""})
    except asyncio.CancelledError:
        if not state["gone"]:
            raise
        task.uncancel()
        log.info("client left during the stream of %s", relay.request_id)
    except UpstreamError as exc:
        # The answer began and broke off: the client's connection is closed without the
        # stream's end, so it knows the answer is incomplete.
        log.warning("upstream stream cut for %s: %r", relay.request_id, exc)
    finally:
        state["relaying"] = False
        watcher.cancel()
        await relay.end()


def openapi_paths() -> dict[str, Any]:
    """The proxy routes in OpenAPI terms (FastAPI documents only the routes it serves)."""
    shape = {"application/json": {"schema": {"$ref": "#/components/schemas/ProxyError"}}}
    errors = {
        str(status): {"description": description, "content": shape}
        for status, description in (
            (400, "The body is not a JSON object with a model (or the route's own checks)."),
            (401, "No API key, or an unknown or revoked one."),
            (
                402,
                "Not enough prepaid credit or monthly budget left for the request's worst-case"
                " cost (type insufficient_quota); nothing was sent upstream.",
            ),
            (502, "The upstream could not be reached, or its answer broke off."),
            (
                503,
                "The gateway is at capacity, its usage spool is full, or the tenant's limits"
                " cannot be checked now (Retry-After).",
            ),
            (504, "The upstream did not answer in time."),
        )
    }

    def operation(summary: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "tags": ["proxy"],
                "parameters": parameters,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": {
                        "description": "The upstream's answer, passed through (a stream as "
                        "server-sent events); the status of an upstream error is passed too.",
                        "headers": {"x-billing-request-id": {"schema": {"type": "string"}}},
                        "content": {
                            "application/json": {"schema": {"type": "object"}},
                            "text/event-stream": {"schema": SSE_EVENT_SCHEMA},
                        },
                    },
                    **errors,
                },
                "security": [{"bearer": []}],
            }
        }

    examples = {"model_action": "gemini-2.5-flash:generateContent", "location": "us-central1"}

    def path_parameter(name: str) -> dict[str, Any]:
        schema = {"type": "string", "example": examples.get(name, "my-project")}
        return {"name": name, "in": "path", "required": True, "schema": schema}

    model = [path_parameter("model_action")]  # {model}:generateContent or :streamGenerateContent
    vertex = [path_parameter("project"), path_parameter("location"), *model]
    gemini = "Gemini generateContent / streamGenerateContent (?alt=sse), billed as google/{model}"
    paths = {
        CHAT: operation("OpenAI-compatible chat completions, billed from the answer's usage", []),
        "/v1/models/{model_action}": operation(gemini, model),
        "/v1beta/models/{model_action}": operation(gemini, model),
    }
    for version in ("v1", "v1beta1"):
        paths[f"/{version}/publishers/google/models/{{model_action}}"] = operation(gemini, model)
        scoped = f"/{version}/projects/{{project}}/locations/{{location}}/publishers/google/models"
        paths[scoped + "/{model_action}"] = operation(gemini, vertex)
    return paths


SSE_EVENT_SCHEMA = {
    "type": "object",
    "description": "One server-sent event of the stream (data: a JSON chunk, or [DONE])",
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}

PROXY_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code", "status"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": "integer"},
                "status": {"type": "string"},
            },
        }
    },
}
"""The error both SDK families read (``proxy.error_body``)."""
