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

What an answer carried and the event it becomes are in ``capture.py``; the HTTP client to
the upstreams is ``upstream.py``. Nothing here knows the web framework: a route reads an
:class:`Incoming` and returns a :class:`Reply`, which ``front.py`` serves as raw ASGI in front
of FastAPI (FastAPI's request and response machinery was ~1/4 of the CPU of a proxied
request, ``bench/gateway.py --cpu-only``).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from services.adapters import metrics
from services.gateway.admission import QuotaUnavailable, Refused, Reservation
from services.gateway.auth import bearer, tenant_of
from services.gateway.capture import (
    NOT_BILLED,
    OPENAI,
    Billed,
    Call,
    Seen,
    StreamReader,
    bill,
    model_problem,
)
from services.gateway.resources import Resources
from services.gateway.upstream import (
    Answer,
    BrokeOff,
    TimedOut,
    Unreachable,
    Upstream,
    UpstreamError,
)

log = logging.getLogger("billing.proxy")

NOT_RELAYED = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"content-encoding",
        b"date",
        b"server",
    }
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
    402: ("insufficient_quota", "RESOURCE_EXHAUSTED"),
    403: ("permission_error", "PERMISSION_DENIED"),
    404: ("not_found_error", "NOT_FOUND"),
    405: ("invalid_request_error", "FAILED_PRECONDITION"),
    429: ("rate_limit_error", "RESOURCE_EXHAUSTED"),
    502: ("api_error", "UNAVAILABLE"),
    503: ("api_error", "UNAVAILABLE"),
    504: ("api_error", "DEADLINE_EXCEEDED"),
}
JSON = (b"content-type", b"application/json")


@dataclass(slots=True)
class Incoming:
    """A request to a proxy route: its path, query string, headers (names lower-case) and a
    way to read its body (which raises :class:`ClientGone` if the client leaves meanwhile)."""

    path: str
    query: str
    headers: Mapping[str, str]
    read_body: Callable[[], Awaitable[bytes]]


@dataclass(slots=True)
class Reply:
    """What a proxy route answers: a whole body, or a :class:`Relay` passing a stream on."""

    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    relay: Relay | None = None


class ClientGone(Exception):
    """The client left before its request was whole: nothing was forwarded, nobody to answer."""


def error_body(status: int, message: str) -> bytes:
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
    return json.dumps(body).encode()


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Reply:
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Reply(status, [JSON, *extra], error_body(status, message))


def parse_body(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to read
        return None
    return body if isinstance(body, dict) else None


async def forward(
    resources: Resources,
    call: Call,
    upstream: Upstream,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    stream: bool,
) -> Reply:
    """Send ``body`` to ``url``, pass the answer back and bill it through the emitter.

    Refused before anything is sent: 503 when the spool is full or the gateway at capacity
    (or the tenant's limits cannot be checked), 402 when the request's worst-case cost does
    not fit the tenant's balance or a hard budget (``admission.py``).
    """
    if not resources.emitter.accepting:
        metrics.PROXY_REFUSED.labels(reason="spool").inc()
        return error(503, "usage spool is full; try again later", {"retry-after": "5"})
    admission = resources.admission
    reservation = None
    if admission is not None:
        try:
            reservation = await admission.admit(call)
        except Refused as exc:
            return error(402, str(exc))
        except QuotaUnavailable as exc:
            metrics.PROXY_REFUSED.labels(reason="quota_unavailable").inc()
            return error(503, f"{exc}; try again shortly", {"retry-after": "2"})
    in_flight = resources.in_flight
    if not in_flight.enter():
        _finish(resources, reservation, NOT_BILLED)
        metrics.PROXY_REFUSED.labels(reason="overload").inc()
        return error(503, "the gateway is at capacity; try again shortly", {"retry-after": "1"})
    try:
        reply = await _send(
            resources, call, upstream, url, headers, body, stream=stream, reservation=reservation
        )
    except BaseException:
        in_flight.leave()
        _finish(resources, reservation, NOT_BILLED)  # unless billing already finished it
        raise
    if reply.relay is None:
        in_flight.leave()  # a relay leaves when its stream ends, however it ends
    return reply


def _finish(resources: Resources, reservation: Reservation | None, billed: Billed) -> None:
    if reservation is not None and resources.admission is not None:
        resources.admission.finish(reservation, billed)


async def _send(
    resources: Resources,
    call: Call,
    upstream: Upstream,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    stream: bool,
    reservation: Reservation | None,
) -> Reply:
    try:
        answer = await _open(call, upstream, url, headers, body)
    except TimedOut:
        _finish(resources, reservation, NOT_BILLED)
        return error(504, "upstream timed out")
    except UpstreamError as exc:
        _finish(resources, reservation, NOT_BILLED)
        log.warning("upstream unreachable for %s: %r", call.request_id, exc)
        return error(502, "upstream unreachable")
    # Names lower-case, as ASGI wants them.
    relayed = [(k.lower(), v) for k, v in answer.headers if k.lower() not in NOT_RELAYED]
    relayed.append((b"x-billing-request-id", call.request_id.encode()))
    succeeded = 200 <= answer.status < 300
    billing = resources.settings.emit_usage
    emitter = resources.emitter

    if stream:
        relay = Relay(resources, call, answer, succeeded, reservation)
        return Reply(answer.status, relayed, relay=relay)
    try:
        content = await answer.read()
    except BrokeOff as exc:  # the answer broke off after its status line
        log.warning("upstream answer cut for %s: %r", call.request_id, exc)
        billed = NOT_BILLED
        if billing and succeeded:
            billed = bill(emitter, call, Seen(), succeeded)  # the prompt was processed
        _finish(resources, reservation, billed)
        return error(504 if exc.timed_out else 502, "the upstream's answer broke off")
    finally:
        await answer.close()
    billed = NOT_BILLED
    if billing:
        seen = Seen()
        try:
            document = json.loads(content, parse_float=Decimal)
        except (ValueError, RecursionError):
            document = None  # not JSON (an upstream error page), or too deep to read
        if isinstance(document, dict):
            seen.observe(call.dialect, document)
        billed = bill(emitter, call, seen, succeeded)
    _finish(resources, reservation, billed)
    return Reply(answer.status, relayed, content)


class Relay:
    """A streamed answer on its way to the client, followed line by line for its usage.
    :meth:`end` — called once the stream is done with, however it ends (finished, cut, the
    client gone, never started) — bills it, frees its in-flight place and the connection."""

    __slots__ = ("_resources", "_call", "_answer", "_succeeded", "_reader", "_ended", "_held")

    def __init__(
        self,
        resources: Resources,
        call: Call,
        answer: Answer,
        succeeded: bool,
        reservation: Reservation | None = None,
    ) -> None:
        self._resources = resources
        self._call = call
        self._answer = answer
        self._succeeded = succeeded
        self._reader = StreamReader(call.dialect)
        self._ended = False
        self._held = reservation

    @property
    def request_id(self) -> str:
        return self._call.request_id

    async def chunks(self) -> AsyncIterator[bytes]:
        """The answer as it arrives (decoded); :class:`BrokeOff` if it is cut."""
        reader = self._reader
        async for chunk in self._answer.chunks():
            reader.feed(chunk)
            yield chunk

    async def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        resources = self._resources
        # Billing and the in-flight place first, without awaiting; a failure in reading
        # what was seen must not keep the place or the connection.
        billed = NOT_BILLED
        try:
            self._reader.end()
            if resources.settings.emit_usage:
                billed = bill(resources.emitter, self._call, self._reader.seen, self._succeeded)
        finally:
            # Billed or not, the reservation becomes the pending charge or is released.
            _finish(resources, self._held, billed)
            resources.in_flight.leave()
            await self._answer.close()


async def _open(
    call: Call, upstream: Upstream, url: str, headers: Mapping[str, str], body: bytes
) -> Answer:
    """Send the request and wait for the answer's head. A reused keep-alive connection that
    fails before any byte of the answer (the upstream closed it while idle: the request never
    reached the model) is retried once on a new connection; a connect error or a failure
    after the answer began is not."""
    try:
        return await upstream.send(url, headers, body)
    except Unreachable as exc:
        if not exc.stale:
            raise
        log.info("retrying %s on a new connection: %r", call.request_id, exc)
    metrics.PROXY_RETRIED.inc()
    return await upstream.send(url, headers, body, fresh=True)


def forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The client headers worth passing on (:data:`FORWARDED`, and the fake upstream's
    ``x-fake-*`` knobs, meaningless to a real upstream); never the client's credentials."""
    return {k: v for k, v in headers.items() if k in FORWARDED or k.startswith("x-fake-")}


async def chat_completions(resources: Resources, incoming: Incoming) -> Reply:
    """``POST /v1/chat/completions``, to OpenRouter (or any OpenAI-compatible upstream)."""
    key = await tenant_of(resources, bearer(incoming.headers))
    raw = await incoming.read_body()
    body = parse_body(raw)
    if body is None or not isinstance(body.get("model"), str) or not body["model"]:
        return error(400, "body must be a JSON object with a model")
    problem = model_problem(body["model"])  # what cannot be billed is not forwarded
    if problem is not None:
        return error(400, problem)
    call = Call(key, OPENAI, body["model"], body, f"req-{uuid.uuid4()}", datetime.now(UTC))
    headers = forwarded_headers(incoming.headers) | resources.upstream_headers
    return await forward(
        resources,
        call,
        resources.upstream,
        "/chat/completions",
        headers,
        raw,
        stream=bool(body.get("stream")),
    )
