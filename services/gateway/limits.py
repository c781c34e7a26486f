"""Bounds on every request's body, applied at ASGI level before any route sees it.

``Gateway.__call__`` (``app.py``) asks :func:`refusal` first: a declared ``Content-Length``
above ``max_body_bytes`` is answered 413 without reading a byte. Otherwise the route reads
through a :class:`Body`, which counts what arrives (a chunked or lying body is stopped at the
limit: :class:`BodyTooLarge`, 413) and gives the whole body ``body_timeout_seconds`` from the
request's head to arrive (:class:`BodyTimedOut`, 408). Once the body is whole the wrapper
steps aside: a later ``receive`` (a streamed answer waiting for the client to leave) is not
timed. Both refusals close the connection (``connection: close``): the rest of the body is
never read.

The routes answer them in their own shape: FastAPI's through ``errors.http_error``
(``{"error": ...}``, the SDKs' shape on the proxy paths), the proxies' through ``front.serve``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from fastapi import HTTPException

from services.gateway import proxy

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
CLOSE = {"connection": "close"}


class BodyRefused(HTTPException):
    """The body was not read whole: too large (413) or too slow (408)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message, headers=CLOSE)


class BodyTooLarge(BodyRefused):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


class BodyTimedOut(BodyRefused):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body did not arrive within {seconds:g} s")


def refusal(headers: list[tuple[bytes, bytes]], limit: int) -> BodyTooLarge | None:
    """413 when the request declares a body above ``limit`` (nothing of it is read)."""
    for name, value in headers:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
            return BodyTooLarge(limit) if declared > limit else None
    return None


async def send_refusal(path: str, refused: BodyRefused, send: Send) -> None:
    """Answer ``refused`` in the shape of ``path``'s routes, closing the connection."""
    if path.startswith(proxy.PROXY_PATHS):
        body = proxy.error_body(refused.status_code, refused.detail)
    else:
        body = orjson.dumps({"error": refused.detail})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": refused.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Body:
    """``receive`` for one request: at most ``limit`` body bytes, all of them before
    ``deadline`` (the event loop's clock); then ``receive`` untouched."""

    __slots__ = ("_receive", "_limit", "_deadline", "_seconds", "_read", "_whole")

    def __init__(self, receive: Receive, limit: int, seconds: float) -> None:
        self._receive = receive
        self._limit = limit
        self._seconds = seconds
        self._deadline = asyncio.get_running_loop().time() + seconds
        self._read = 0
        self._whole = False

    async def __call__(self) -> Message:
        if self._whole:
            return await self._receive()
        try:
            async with asyncio.timeout_at(self._deadline):
                message = await self._receive()
        except TimeoutError:
            raise BodyTimedOut(self._seconds) from None
        if message["type"] == "http.request":
            self._read += len(message.get("body", b""))
            if self._read > self._limit:
                raise BodyTooLarge(self._limit)
            if not message.get("more_body"):
                self._whole = True
        return message
