"""An httpx transport on aiohttp's client: the proxies keep httpx's API (requests, streamed
responses, timeouts, errors) and send through aiohttp's connection pool and C parser.

Errors come back as the httpx exceptions httpcore would raise for the same failure (a
refused connection is a ``ConnectError``, an upstream that closed a pooled connection a
``RemoteProtocolError`` or ``ReadError``, a slow answer a ``ReadTimeout``), and httpcore's
trace extension sees the two events the keep-alive retry in ``proxy._open`` reads: a new
TCP connection and the request's headers going out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import aiohttp
import httpx

Trace = Callable[[str, object], Awaitable[None]]


@contextmanager
def _as_httpx(reading: bool) -> Iterator[None]:
    """aiohttp's exceptions as httpx's (``reading``: the answer's body was being read)."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or repr(exc)) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or repr(exc)) from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc) or repr(exc)) from exc
    except aiohttp.ServerDisconnectedError as exc:
        raise httpx.RemoteProtocolError(str(exc) or repr(exc)) from exc
    except (aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
        raise httpx.ReadError(str(exc) or repr(exc)) from exc
    except aiohttp.ClientResponseError as exc:  # a malformed answer
        raise httpx.RemoteProtocolError(str(exc) or repr(exc)) from exc
    except aiohttp.ClientError as exc:
        if reading:
            raise httpx.ReadError(str(exc) or repr(exc)) from exc
        raise httpx.NetworkError(str(exc) or repr(exc)) from exc


class _Body(httpx.AsyncByteStream):
    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx(reading=True):
            async for chunk in self._response.content.iter_any():  # as it arrives
                yield chunk

    async def aclose(self) -> None:
        # Back to the pool when the body was read to its end, closed otherwise.
        self._response.release()


async def _connecting(_: object, context: SimpleNamespace, __: object) -> None:
    trace: Trace | None = context.trace_request_ctx
    if trace is not None:
        await trace("connection.connect_tcp.started", None)


async def _sent(_: object, context: SimpleNamespace, __: object) -> None:
    trace: Trace | None = context.trace_request_ctx
    if trace is not None:
        await trace("http11.send_request_headers.complete", None)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Plain-HTTP/1.1 (or TLS) requests through one ``aiohttp.ClientSession``, opened on the
    first request (in the serving event loop). ``keep_alive=False`` closes every connection
    after its answer."""

    def __init__(self, *, max_connections: int, keep_alive: bool = True) -> None:
        self._limit = max_connections
        self._keep_alive = keep_alive
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        tracing = aiohttp.TraceConfig()
        tracing.on_connection_create_start.append(_connecting)
        tracing.on_request_headers_sent.append(_sent)
        connector = aiohttp.TCPConnector(
            limit=self._limit,
            force_close=not self._keep_alive,
            ssl=httpx.create_ssl_context(),  # httpx's certificate checks (certifi's roots)
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            trace_configs=[tracing],
            auto_decompress=False,  # httpx decodes, as it does for httpcore's answers
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        timeout: dict[str, Any] = request.extensions.get("timeout", {})
        try:
            data: Any = request.content or None
        except httpx.RequestNotRead:
            data = request.stream
        with _as_httpx(reading=False):
            response = await session.request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=data,
                allow_redirects=False,
                compress=None,
                timeout=aiohttp.ClientTimeout(
                    sock_connect=timeout.get("connect"), sock_read=timeout.get("read")
                ),
                trace_request_ctx=request.extensions.get("trace"),
            )
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_Body(response),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
