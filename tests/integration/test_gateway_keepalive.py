"""A pooled keep-alive connection the upstream closed: retried once on a new connection.

The upstream here is a tiny asyncio server on loopback. It answers the first request of a
connection (keep-alive, nothing says it will close) and drops the connection when a second
request arrives on it, answering nothing: what an upstream closing an idle keep-alive
connection at the moment the gateway reuses it looks like.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from services.gateway import upstream as client_of
from services.gateway.capture import OPENAI, Call
from services.gateway.front import respond
from services.gateway.keys import TenantKey
from services.gateway.proxy import forward
from services.gateway.resources import InFlight
from services.gateway.upstream import AiohttpUpstream, HttpxUpstream
from tests.integration.test_proxy import CHAT, CollectingEmitter

pytestmark = pytest.mark.integration

TRANSPORTS = ("httpcore", "aiohttp")
"""The upstream clients: on httpx's own transport (httpcore) and the gateway's, on aiohttp."""

USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
ANSWER = json.dumps({"choices": [{"message": {"content": "hi"}}], "usage": USAGE}).encode()


class Upstream:
    """Counts the requests it received; ``mode`` says what it does with them."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.received = 0
        self.answered = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served_here = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                )
                await reader.readexactly(length)
                self.received += 1
                if self.mode == "silent":
                    await asyncio.sleep(5)  # longer than the client waits
                    return
                if self.mode == "drop-all" or (self.mode == "drop-reused" and served_here):
                    return  # closed without a byte of an answer
                if self.mode == "cut-answer":
                    writer.write(b'HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n{"cho')
                    await writer.drain()
                    return  # the answer began, then the connection went
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
                )
                await writer.drain()
                served_here += 1
                self.answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def gateway_before(
    upstream: Upstream | None, transport: str
) -> AsyncIterator[tuple[httpx.AsyncClient, list[Any]]]:
    """``forward`` in an app, its upstream clients (on ``transport``) on the real network to
    ``upstream`` (to a port nobody listens on when ``None``)."""
    server = None
    if upstream is not None:
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
    else:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
    emitter = CollectingEmitter()
    base, timeout = f"http://127.0.0.1:{port}", 0.3
    client: client_of.Upstream
    if transport == "aiohttp":
        client = AiohttpUpstream(base_url=base, max_connections=8, timeout=timeout)
    else:
        client = HttpxUpstream(base_url=base, timeout=timeout)
    resources: Any = SimpleNamespace(
        emitter=emitter,
        settings=SimpleNamespace(emit_usage=True),
        in_flight=InFlight(8),
        admission=None,
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        call = Call(
            TenantKey("acme", "k1"), OPENAI, str(CHAT["model"]), CHAT, "req-x", datetime.now(UTC)
        )
        body = json.dumps(CHAT).encode()
        reply = await forward(resources, call, client, "/chat/completions", {}, body, stream=False)
        await respond(reply, send, receive)

    try:
        asgi = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=asgi, base_url="http://g") as gateway:
            yield gateway, emitter.events
    finally:
        await client.close()
        if server is not None:
            server.close()
            await server.wait_closed()


async def test_a_stale_pooled_connection_is_retried_on_a_new_one_and_billed_once(
    transport: str,
) -> None:
    upstream = Upstream("drop-reused")
    async with gateway_before(upstream, transport) as (gateway, events):
        first = await gateway.post("/relay")
        assert first.status_code == 200 and len(events) == 1
        second = await gateway.post("/relay")  # goes out on the pooled connection first
        assert second.status_code == 200, second.text
        assert second.json()["usage"] == USAGE
    assert upstream.received == 3  # the dropped attempt, then the retry
    assert upstream.answered == 2
    assert len(events) == 2  # each request billed once


async def test_an_answer_cut_after_its_first_bytes_is_not_retried(transport: str) -> None:
    upstream = Upstream("cut-answer")
    async with gateway_before(upstream, transport) as (gateway, events):
        relayed = await gateway.post("/relay")
    assert relayed.status_code == 502
    assert upstream.received == 1
    assert len(events) == 1 and events[0].usage_source == "estimated"  # its prompt


async def test_a_new_connection_dropped_before_an_answer_is_not_retried(transport: str) -> None:
    # The request may have reached the model: only a reused connection proves it did not.
    upstream = Upstream("drop-all")
    async with gateway_before(upstream, transport) as (gateway, events):
        relayed = await gateway.post("/relay")
    assert relayed.status_code == 502
    assert upstream.received == 1 and events == []


async def test_a_connect_error_is_not_retried(transport: str) -> None:
    async with gateway_before(None, transport) as (gateway, events):
        relayed = await gateway.post("/relay")
    assert relayed.status_code == 502 and relayed.json()["error"]["message"] == (
        "upstream unreachable"
    )
    assert events == []


async def test_an_upstream_that_does_not_answer_in_time_is_a_504(transport: str) -> None:
    upstream = Upstream("silent")
    async with gateway_before(upstream, transport) as (gateway, events):
        relayed = await gateway.post("/relay")
    assert relayed.status_code == 504, relayed.text
    assert relayed.json()["error"]["message"] == "upstream timed out"
    assert upstream.received == 1 and events == []
