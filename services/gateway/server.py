"""The gateway's HTTP/1.1 protocol: uvicorn's httptools one, with every request's *head*
(request line and headers) bounded in size and in time.

httptools keeps a head in memory until its blank line, however long, and uvicorn waits for
it as long as the client likes: megabytes of headers, or heads trickled a byte at a time
(slowloris), would hold memory and connections. :class:`HeadLimitedProtocol` answers 431
once a head passes ``max_head_bytes`` and 408 once a head has taken ``head_timeout_seconds``
from its first byte — or a new connection as long to send its first byte. Both close the
connection and answer in the shape of the body limits' refusals (``limits.py``). An idle
keep-alive connection is uvicorn's own: ``timeout_keep_alive`` closes it.

Counting (``data_received``): a read is counted whole while the parser is between requests
or in a head — one add and one comparison. The parser's callbacks say where a head ends
(``on_headers_complete``: nothing is counted in a body) and where the next may begin
(``on_message_complete``: the count restarts at 0). httptools does not say *where* in a read
a callback fired, so a read that could take the count past the limit, or a body's read
longer than the limit, is fed in pieces that cannot: first exactly what the head may still
take (if it is not complete then, 431, and the rest is never parsed), then pieces of at most
``max_head_bytes``. A head that begins a read — a new connection's first request, a
keep-alive connection's next — is measured exactly; one that begins part-way through a
piece (pipelined behind another request) is counted from the piece's end, so it is refused
before it reaches twice the limit.

Timing: one ``loop.call_later`` handle per head, and only for a head that did not arrive
whole in the read that began it (most do), cancelled by ``on_headers_complete``. It is not
armed while earlier requests of the connection are being answered (uvicorn stops reading
behind a pipelined request: the wait would be the gateway's), but once they are.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from services.adapters.settings import Settings
from services.gateway import proxy

_PROXY_TARGETS = tuple(path.encode() for path in proxy.PROXY_PATHS)


@functools.cache
def head_limits() -> tuple[int, float]:
    """``(max_head_bytes, head_timeout_seconds)``, read once per process: each worker of
    ``billing gateway --workers N`` is a fresh interpreter (uvicorn passes it this class by
    name), started with the gateway command's environment."""
    settings = Settings()
    return settings.max_head_bytes, settings.head_timeout_seconds


class HeadLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, each request's head bounded in size (431) and time (408)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.max_head, self.head_seconds = head_limits()
        self.url = b""  # uvicorn's: the target read so far (a refusal's shape follows it)
        self._head: int | None = 0
        """Bytes counted for the head being read or awaited; ``None`` inside a body."""
        self._in_head = False
        """A head has begun and is not complete."""
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: bytes | None = None
        """The 431 or 408 given (or waiting for earlier answers): nothing more is parsed."""

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_seconds, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            counted = self._head + len(data)
            if counted > self.max_head:
                self._read_in_pieces(data)
                return
            self._head = counted
        elif len(data) > self.max_head:
            self._read_in_pieces(data)
            return
        super().data_received(data)
        if self._in_head and self._head_timer is None:
            self._time_head()

    def _read_in_pieces(self, data: bytes) -> None:
        """Feed ``data`` in pieces none of which can take a head past the limit unseen."""
        start = 0
        while start < len(data):
            if self._refusal is not None or self.transport.is_closing():
                return  # refused (its count stays at the limit), or closed (a 400)
            if self.transport.get_protocol() is not self:
                return  # upgraded: uvicorn hands the new protocol the head alone, too
            if self._head is None:  # in a body: a head that begins in it is at most a piece
                end = start + self.max_head
            else:
                room = self.max_head - self._head
                if room <= 0:  # the head has taken the limit and is not complete
                    self._refuse(431, f"the request head is larger than {self.max_head} bytes")
                    return
                end = start + room
                self._head += min(room, len(data) - start)
            super().data_received(data[start:end])
            start = end
        if self._in_head and self._head_timer is None:
            self._time_head()

    # Parser callbacks (httptools calls them from within ``data_received``)
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._stop_head_timer()  # a new connection's wait for its first byte is over

    def on_headers_complete(self) -> None:
        self._head = None
        self._in_head = False
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or not self.cycle.response_complete:
            return  # closed, or the next pipelined request is being answered
        if self._refusal is not None:
            self._answer(self._refusal)
        elif self._in_head and self._head_timer is None:
            self._unset_keepalive_if_required()  # a head has begun: ours times it, not idle's
            self._time_head()

    def _time_head(self) -> None:
        """Give the head being read ``head_seconds``, unless an earlier request is still
        being answered (``on_response_complete`` calls again)."""
        if self.cycle is None or self.cycle.response_complete:
            self._head_timer = self.loop.call_later(self.head_seconds, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._refuse(408, f"the request head did not arrive within {self.head_seconds:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` and close — after the answers to earlier (pipelined) requests
        when some are still being written. Nothing more is parsed."""
        self._stop_head_timer()
        self._head = self.max_head  # every later read takes _read_in_pieces, which drops it
        self._refusal = self._error_response(status, message)
        if self.cycle is None or self.cycle.response_complete:
            self._answer(self._refusal)

    def _answer(self, response: bytes) -> None:
        self.transport.write(response)
        self.transport.close()

    def _error_response(self, status: int, message: str) -> bytes:
        # The shape of limits.send_refusal: the SDKs' on the proxy routes, {"error": ...}
        # elsewhere (and when the target is not known yet).
        target = self.url if self._in_head else b""
        if target.startswith(_PROXY_TARGETS):
            body = proxy.error_body(status, message)
        else:
            body = orjson.dumps({"error": message})
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % len(body)
        )
        return b"".join(head) + body
