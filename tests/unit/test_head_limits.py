"""Request heads bounded in size and time: the settings, and ``HeadLimitedProtocol`` fed
reads by hand (a fake transport, no socket), where pipelining and read boundaries can be
chosen exactly. ``tests/integration/test_gateway_head_limits.py`` runs ``billing gateway``."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import pytest
from pydantic import ValidationError
from uvicorn.config import Config
from uvicorn.server import ServerState

from services.adapters.settings import Settings
from services.gateway import server
from services.gateway.server import HeadLimitedProtocol

LIMIT = 1024
SECONDS = 0.05


def test_the_head_limits_default_to_64_kib_and_10_s() -> None:
    settings = Settings()
    assert settings.max_head_bytes == 65536
    assert settings.head_timeout_seconds == 10


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BILLING_MAX_HEAD_BYTES", "1023"),  # not even a request line and a few headers
        ("BILLING_MAX_HEAD_BYTES", "64k"),
        ("BILLING_HEAD_TIMEOUT_SECONDS", "0"),
        ("BILLING_HEAD_TIMEOUT_SECONDS", "-1"),
        ("BILLING_HEAD_TIMEOUT_SECONDS", "soon"),
    ],
)
def test_head_limits_out_of_range_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("BILLING_").lower()):
        Settings()


def test_the_protocol_reads_its_limits_from_the_environment_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server.head_limits.cache_clear()
    try:
        monkeypatch.setenv("BILLING_MAX_HEAD_BYTES", "2048")
        monkeypatch.setenv("BILLING_HEAD_TIMEOUT_SECONDS", "2.5")
        assert server.head_limits() == (2048, 2.5)
        monkeypatch.setenv("BILLING_MAX_HEAD_BYTES", "4096")
        assert server.head_limits() == (2048, 2.5)  # per process, not per connection
    finally:
        server.head_limits.cache_clear()


# -- the protocol ------------------------------------------------------------------------------


class Transport(asyncio.Transport):
    """What the protocol wrote, and whether it closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.protocol: asyncio.BaseProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def statuses(self) -> list[int]:
        """The status of every response written so far."""
        return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", self.written)]

    def last_body(self) -> Any:
        return json.loads(bytes(self.written).rsplit(b"\r\n\r\n", 1)[1])


class App:
    """Answers 200 ``ok``; a request to ``/slow`` waits for ``release`` first."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["path"] == "/slow":
            await self.release.wait()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def app() -> App:
    return App()


@pytest.fixture
def connect(
    monkeypatch: pytest.MonkeyPatch, app: App
) -> Callable[[], tuple[HeadLimitedProtocol, Transport]]:
    monkeypatch.setattr(server, "head_limits", lambda: (LIMIT, SECONDS))
    config = Config(app=app, lifespan="off", log_config=None, proxy_headers=False)
    config.load()

    def connect() -> tuple[HeadLimitedProtocol, Transport]:
        protocol = HeadLimitedProtocol(config, ServerState(), {}, asyncio.get_running_loop())
        transport = Transport()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        return protocol, transport

    return connect


Connect = Callable[[], tuple[HeadLimitedProtocol, Transport]]


def head(size: int, path: str = "/") -> bytes:
    """A GET head of exactly ``size`` bytes."""
    bare = b"GET %s HTTP/1.1\r\nhost: g\r\nx-pad: \r\n\r\n" % path.encode()
    assert size >= len(bare)
    return bare.replace(b"x-pad: ", b"x-pad: " + b"a" * (size - len(bare)))


async def settle() -> None:
    """Let the app's tasks write their answers (a few turns of the loop, no clock)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_head_of_the_limit_is_served_and_one_byte_more_refused(connect: Connect) -> None:
    protocol, transport = connect()
    protocol.data_received(head(LIMIT)[:300])
    protocol.data_received(head(LIMIT)[300:])
    await settle()
    assert transport.statuses() == [200] and not transport.closed

    protocol, transport = connect()
    protocol.data_received(head(LIMIT + 1)[:300])
    protocol.data_received(head(LIMIT + 1)[300:])
    await settle()
    assert transport.statuses() == [431] and transport.closed
    assert transport.last_body() == {"error": "the request head is larger than 1024 bytes"}


async def test_a_read_of_a_small_head_and_a_large_body_is_served(connect: Connect) -> None:
    protocol, transport = connect()
    body = b"x" * (20 * LIMIT)
    protocol.data_received(b"POST / HTTP/1.1\r\nhost: g\r\ncontent-length: %d\r\n\r\n" % len(body))
    protocol.data_received(body)
    protocol.data_received(head(200))  # the next request on the connection
    await settle()
    assert transport.statuses() == [200, 200] and not transport.closed

    protocol, transport = connect()  # all in one read
    protocol.data_received(
        b"POST / HTTP/1.1\r\nhost: g\r\ncontent-length: %d\r\n\r\n%s%s"
        % (len(body), body, head(200))
    )
    await settle()
    assert transport.statuses() == [200, 200] and not transport.closed


async def test_each_head_of_a_connection_is_counted_on_its_own(connect: Connect) -> None:
    protocol, transport = connect()
    for _ in range(5):  # keep-alive: 5 heads of 600 bytes, 3,000 in all
        protocol.data_received(head(600))
        await settle()
    assert transport.statuses() == [200] * 5

    protocol, transport = connect()
    protocol.data_received(head(600) * 5)  # pipelined, in one read
    await settle()
    assert transport.statuses() == [200] * 5 and not transport.closed


async def test_a_head_hidden_in_a_large_read_is_refused(connect: Connect) -> None:
    # A whole oversized head after a body in one read: were the read fed whole, httptools
    # would parse it without a byte of it counted.
    protocol, transport = connect()
    body = b"x" * LIMIT
    protocol.data_received(b"POST / HTTP/1.1\r\nhost: g\r\ncontent-length: %d\r\n\r\n" % len(body))
    protocol.data_received(body + head(3 * LIMIT))
    await settle()
    assert transport.statuses() == [200, 431] and transport.closed


async def test_a_pipelined_head_too_large_is_answered_after_the_answer_before_it(
    connect: Connect, app: App
) -> None:
    protocol, transport = connect()
    protocol.data_received(head(100, "/slow") + head(3 * LIMIT))
    await settle()
    assert transport.statuses() == [] and not transport.closed  # answers keep their order
    protocol.data_received(b"more of the head, never parsed")
    app.release.set()
    await settle()
    assert transport.statuses() == [200, 431] and transport.closed


async def test_a_head_not_complete_in_time_is_answered_408(connect: Connect) -> None:
    protocol, transport = connect()
    protocol.data_received(b"POST /v1/chat/completions HTTP/1.1\r\nhost: g\r\n")
    await asyncio.sleep(SECONDS * 2)
    assert transport.statuses() == [408] and transport.closed
    assert transport.last_body()["error"]["message"] == (
        "the request head did not arrive within 0.05 s"
    )  # the SDKs' shape: a proxy route's head


async def test_a_new_connection_that_sends_nothing_is_answered_408(connect: Connect) -> None:
    protocol, transport = connect()
    await asyncio.sleep(SECONDS * 2)
    assert transport.statuses() == [408] and transport.closed
    assert transport.last_body() == {"error": "the request head did not arrive within 0.05 s"}


async def test_an_idle_keep_alive_connection_is_left_to_uvicorn(connect: Connect) -> None:
    protocol, transport = connect()
    protocol.data_received(head(100))
    await asyncio.sleep(SECONDS * 2)  # uvicorn's timeout_keep_alive (5 s) closes it
    assert transport.statuses() == [200] and not transport.closed


async def test_a_head_is_timed_once_the_answers_before_it_are_written(
    connect: Connect, app: App
) -> None:
    protocol, transport = connect()
    protocol.data_received(head(100, "/slow") + b"GET / HTTP/1.1\r\n")
    await asyncio.sleep(SECONDS * 2)  # the gateway is answering: the wait is not the client's
    assert transport.statuses() == [] and not transport.closed
    app.release.set()
    await settle()
    assert transport.statuses() == [200] and not transport.closed
    await asyncio.sleep(SECONDS * 2)
    assert transport.statuses() == [200, 408] and transport.closed
