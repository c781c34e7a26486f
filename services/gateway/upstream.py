"""The proxies' HTTP client to the LLM upstreams: one small interface, two implementations.

:class:`Upstream` sends one request and returns the answer's head (:class:`Answer`), whose
body is then read whole or chunk by chunk, decoded. Failures come back as this module's
exceptions, the same whichever client is underneath, so the forwarder decides once what a
client sees (``proxy.py``):

- :class:`Unreachable`: no answer began (a refused or dropped connection). ``stale`` says the
  request went out on a pooled keep-alive connection and failed before any byte of an answer
  arrived — the upstream had closed it while idle, the request never reached the model —
  which the forwarder retries once on a new connection (``fresh=True``);
- :class:`TimedOut`: no connection or no answer in time;
- :class:`BrokeOff`: the answer began, then its body could not be read to the end.

:class:`AiohttpUpstream` is the gateway's: aiohttp's client used directly (its connection
pool and C parser; httpx over an aiohttp transport cost ~0.3-0.5 ms more CPU per request,
``bench/gateway.py --cpu-only``). :class:`HttpxUpstream` puts the same interface on any
httpx transport: tests hand ``create_app`` an ``httpx.MockTransport`` to play the upstream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Protocol

import aiohttp
import httpx


class UpstreamError(Exception):
    """The upstream could not be reached or its answer could not be read."""


class Unreachable(UpstreamError):
    def __init__(self, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale


class TimedOut(UpstreamError):
    pass


class BrokeOff(UpstreamError):
    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class Answer(Protocol):
    """An upstream answer whose head has arrived."""

    status: int
    headers: list[tuple[bytes, bytes]]
    """As received, names in any case; the body is relayed decoded (``content-encoding`` is
    not to be passed on)."""

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, decoded."""
        ...

    async def close(self) -> None:
        """Give the connection back (read to its end) or close it (not)."""
        ...


class Upstream(Protocol):
    async def send(
        self, url: str, headers: Mapping[str, str], body: bytes, *, fresh: bool = False
    ) -> Answer:
        """POST ``body`` to ``url`` (absolute, or relative to the upstream's base URL) and
        wait for the answer's head; ``fresh``: on a new connection, closed after the answer."""
        ...

    async def close(self) -> None: ...


# -- aiohttp ---------------------------------------------------------------------------------


@contextmanager
def _aiohttp_errors(reading: bool, reused: SimpleNamespace | None = None) -> Iterator[None]:
    """aiohttp's exceptions as this module's (``reading``: the body was being read)."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise TimedOut(_text(exc)) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        if reading:
            raise BrokeOff(_text(exc), timed_out=True) from exc
        raise TimedOut(_text(exc)) from exc
    except aiohttp.ClientConnectorError as exc:
        raise Unreachable(_text(exc)) from exc
    except aiohttp.ClientError as exc:
        if reading:
            raise BrokeOff(_text(exc)) from exc
        # A dropped connection, a reset, a malformed head: no answer began.
        raise Unreachable(_text(exc), stale=bool(reused and reused.value)) from exc


def _text(exc: BaseException) -> str:
    return str(exc) or repr(exc)


class _AiohttpAnswer:
    __slots__ = ("status", "headers", "_response")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.status = response.status
        self.headers = list(response.raw_headers)
        self._response = response

    async def read(self) -> bytes:
        with _aiohttp_errors(reading=True):
            return await self._response.read()

    async def chunks(self) -> AsyncIterator[bytes]:
        with _aiohttp_errors(reading=True):
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def close(self) -> None:
        self._response.release()


async def _reusing(_: object, context: SimpleNamespace, __: object) -> None:
    context.trace_request_ctx.value = True


class AiohttpUpstream:
    """Requests through aiohttp client sessions opened on first use (in the serving event
    loop): one keeping up to ``max_connections`` connections alive, one closing each
    connection after its answer (``fresh``). ``base_url`` prefixes relative URLs."""

    def __init__(self, *, base_url: str = "", max_connections: int, timeout: float) -> None:
        self._base = base_url.rstrip("/")
        self._limit = max_connections
        # connect: a pooled connection, or a new one with its DNS, TCP and TLS, within the
        # request's timeout; TCP itself within 5 s; then each read within the timeout.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=5.0, sock_read=timeout
        )
        self._pooled: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None

    def _session(self, fresh: bool) -> aiohttp.ClientSession:
        tracing = aiohttp.TraceConfig()
        tracing.on_connection_reuseconn.append(_reusing)
        connector = aiohttp.TCPConnector(
            limit=self._limit,
            force_close=fresh,
            ssl=httpx.create_ssl_context(),  # certifi's roots, checked as httpx would
        )
        return aiohttp.ClientSession(
            connector=connector,
            trace_configs=[tracing],
            timeout=self._timeout,
            skip_auto_headers=("User-Agent",),
            headers={"user-agent": "llm-billing-gateway"},
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def send(
        self, url: str, headers: Mapping[str, str], body: bytes, *, fresh: bool = False
    ) -> Answer:
        if fresh:
            session = self._fresh = self._fresh or self._session(fresh=True)
        else:
            session = self._pooled = self._pooled or self._session(fresh=False)
        if not url.startswith(("http://", "https://")):
            url = self._base + url
        reused = SimpleNamespace(value=False)
        with _aiohttp_errors(reading=False, reused=reused):
            response = await session.post(
                url, data=body, headers=headers, allow_redirects=False, trace_request_ctx=reused
            )
        return _AiohttpAnswer(response)

    async def close(self) -> None:
        for session in (self._pooled, self._fresh):
            if session is not None:
                await session.close()


# -- httpx (any transport: tests play the upstream with httpx.MockTransport) ------------------


@contextmanager
def _httpx_errors(reading: bool, connection: _Connection | None = None) -> Iterator[None]:
    try:
        yield
    except httpx.TimeoutException as exc:
        if reading:
            raise BrokeOff(_text(exc), timed_out=True) from exc
        raise TimedOut(_text(exc)) from exc
    except httpx.TransportError as exc:
        if reading:
            raise BrokeOff(_text(exc)) from exc
        stale = (
            isinstance(exc, httpx.ReadError | httpx.WriteError | httpx.RemoteProtocolError)
            and connection is not None
            and connection.reused
        )
        raise Unreachable(_text(exc), stale=stale) from exc
    except httpx.HTTPError as exc:
        if reading:
            raise BrokeOff(_text(exc)) from exc
        raise Unreachable(_text(exc)) from exc


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


class _HttpxAnswer:
    __slots__ = ("status", "headers", "_response")

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.headers = list(response.headers.raw)
        self._response = response

    async def read(self) -> bytes:
        with _httpx_errors(reading=True):
            return await self._response.aread()

    async def chunks(self) -> AsyncIterator[bytes]:
        with _httpx_errors(reading=True):
            async for chunk in self._response.aiter_bytes():
                yield chunk

    async def close(self) -> None:
        await self._response.aclose()


class HttpxUpstream:
    """The interface on httpx clients over ``transport`` (httpx's own when ``None``)."""

    def __init__(
        self,
        *,
        base_url: str = "",
        timeout: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        limits = httpx.Timeout(timeout, connect=5.0)
        self._pooled = httpx.AsyncClient(base_url=base_url, timeout=limits, transport=transport)
        self._fresh = httpx.AsyncClient(
            base_url=base_url,
            timeout=limits,
            transport=transport,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    async def send(
        self, url: str, headers: Mapping[str, str], body: bytes, *, fresh: bool = False
    ) -> Answer:
        client = self._fresh if fresh else self._pooled
        request = client.build_request("POST", url, content=body, headers=dict(headers))
        connection = _Connection()
        request.extensions["trace"] = connection.trace
        with _httpx_errors(reading=False, connection=connection):
            return _HttpxAnswer(await client.send(request, stream=True))

    async def close(self) -> None:
        await self._pooled.aclose()
        await self._fresh.aclose()
