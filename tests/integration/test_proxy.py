"""The chat-completions proxy in front of the fake upstream: billed from the upstream's usage."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from services.adapters.database import init_connection
from services.adapters.kafka import ensure_topics
from services.adapters.settings import Settings
from services.adapters.tenants import create_key, create_tenant
from services.adapters.topics import Topics
from services.core.events import UsageRecorded, decode_recorded
from services.gateway.app import create_app
from services.gateway.capture import OPENAI, Call
from services.gateway.front import respond
from services.gateway.keys import TenantKey
from services.gateway.proxy import forward
from services.gateway.resources import InFlight
from services.gateway.upstream import HttpxUpstream
from services.local.fake_upstream import create_fake_upstream
from tests.integration.test_ingest import read_all

pytestmark = pytest.mark.integration

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "count " * 50}]}


class Recording(httpx.AsyncBaseTransport):
    """Keeps every request that reaches the upstream."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.inner.handle_async_request(request)


async def make_key(database_url: str) -> str:
    connection = await asyncpg.connect(database_url)
    await init_connection(connection)
    try:
        await create_tenant(connection, "acme")
        return (await create_key(connection, "acme", "proxy-test"))[1]
    finally:
        await connection.close()


Setup = tuple[TestClient, Recording, str, Topics]


@contextlib.contextmanager
def gateway_before_fake_upstream(
    database_url: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, **settings: Any
) -> Iterator[Setup]:
    """The gateway in-process before the fake upstream, on the session broker, ready; a key
    of tenant ``acme``. ``settings`` add to (or replace) the gateway's settings."""
    topics = Topics.named(topic_prefix)
    asyncio.run(ensure_topics(kafka_bootstrap, topics.partitions()))
    key = asyncio.run(make_key(database_url))
    transport = Recording(httpx.ASGITransport(app=create_fake_upstream()))
    configured = Settings(
        **{
            "data_dir": tmp_path,
            "catalogue_sync": False,
            "database_url": database_url,
            "kafka_bootstrap": kafka_bootstrap,
            "topic_prefix": topic_prefix,
            "openrouter_base_url": "http://upstream.test/api/v1",
            **settings,
        }
    )
    with TestClient(create_app(configured, upstream_transport=transport)) as client:
        for _ in range(200):
            if client.get("/readyz").status_code == 200:
                break
            asyncio.run(asyncio.sleep(0.05))
        yield client, transport, key, topics


@pytest.fixture
def setup(
    database_url: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> Iterator[Setup]:
    with gateway_before_fake_upstream(database_url, kafka_bootstrap, topic_prefix, tmp_path) as s:
        yield s


def test_json_and_streamed_completions_are_billed_from_upstream_usage(
    setup: Setup, kafka_bootstrap: str
) -> None:
    client, _, key, topics = setup
    auth = {"Authorization": f"Bearer {key}"}
    plain = client.post(
        "/v1/chat/completions", json=CHAT, headers=auth | {"x-fake-reasoning-tokens": "6"}
    )
    assert plain.status_code == 200
    upstream_usage = json.loads(plain.content, parse_float=Decimal)["usage"]
    streamed = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth)
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    final = [
        json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")
    ][-1]

    events = {
        e.request_id: e
        for e in map(decode_recorded, asyncio.run(read_all(kafka_bootstrap, topics.usage, 2)))
    }
    assert len(events) == 2
    by_id = events[plain.headers["x-billing-request-id"]]
    assert by_id.tenant_id == "acme" and by_id.api_key_id
    assert by_id.usage.prompt_tokens == upstream_usage["prompt_tokens"]
    assert by_id.usage.reasoning_tokens == 6
    assert by_id.reported is not None and by_id.reported.cost == upstream_usage["cost"]
    streamed_event = events[streamed.headers["x-billing-request-id"]]
    assert streamed_event.usage.completion_tokens == final["usage"]["completion_tokens"]
    exposition = client.get("/metrics").text
    assert "billing_emit_queue_depth 0.0" in exposition
    assert "billing_emit_oldest_unsent_seconds 0.0" in exposition


def test_missing_or_unknown_keys_never_reach_the_upstream(
    setup: Setup,
) -> None:
    client, transport, _, _ = setup
    for headers in ({}, {"Authorization": "Bearer bk_0_unknown"}):
        assert client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 401
    assert transport.requests == []


def test_upstream_errors_pass_through_unbilled(setup: Setup, kafka_bootstrap: str) -> None:
    client, _, key, topics = setup
    failed = client.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {key}", "x-fake-status": "502"},
    )
    assert failed.status_code == 502
    assert asyncio.run(read_all(kafka_bootstrap, topics.usage, 1, timeout=3)) == []


def test_a_cut_stream_is_billed_from_an_estimate(setup: Setup, kafka_bootstrap: str) -> None:
    client, _, key, topics = setup
    headers = {
        "Authorization": f"Bearer {key}",
        "x-fake-completion-tokens": "40",
        "x-fake-cut-after": "5",  # five words, then the upstream hangs up: no usage
    }
    cut = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers)
    assert cut.status_code == 200 and "[DONE]" not in cut.text
    (event,) = map(decode_recorded, asyncio.run(read_all(kafka_bootstrap, topics.usage, 1)))
    assert event.request_id == cut.headers["x-billing-request-id"]
    assert event.usage_source == "estimated" and event.reported is None
    assert 5 <= event.usage.completion_tokens <= 15  # five short words, not forty
    assert event.usage.prompt_tokens > 50  # "count " * 50, plus the chat formatting


@pytest.mark.parametrize(("policy", "second_status"), [("reject", 503), ("accept", 200)])
def test_a_full_spool_refuses_requests_when_the_policy_says_so(
    database_url: str, tmp_path: Path, policy: str, second_status: int
) -> None:
    key = asyncio.run(make_key(database_url))
    settings = Settings(
        data_dir=tmp_path,
        catalogue_sync=False,
        database_url=database_url,
        kafka_bootstrap=None,  # no broker: every event goes to the spool
        spool_max_bytes=1,
        spool_full_policy=policy,  # type: ignore[arg-type]
        openrouter_base_url="http://upstream.test/api/v1",
    )
    transport = httpx.ASGITransport(app=create_fake_upstream())
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings, upstream_transport=transport)) as client:
        assert client.post("/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
        for _ in range(100):  # the first request's usage reaches the disk
            if "billing_spool_bytes 0.0" not in client.get("/metrics").text:
                break
            asyncio.run(asyncio.sleep(0.05))
        second = client.post("/v1/chat/completions", json=CHAT, headers=auth)
        assert second.status_code == second_status
        if second_status == 503:
            assert second.headers["retry-after"] == "5"
            assert "spool is full" in second.json()["error"]["message"]
    assert list((tmp_path / "spool").glob("0*.jsonl")), "the usage stays on disk for later"


def test_errors_take_the_sdk_shape_and_client_credentials_stay_here(
    setup: Setup,
) -> None:
    client, transport, key, _ = setup
    refused = client.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 401
    error = refused.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == 401
    assert error["status"] == "UNAUTHENTICATED" and "key" in error["message"]

    headers = {
        "Authorization": f"Bearer {key}",
        "x-api-key": "the client's own secret",
        "x-title": "acme app",
        "http-referer": "https://acme.example",
    }
    answered = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert answered.status_code == 200
    sent = transport.requests[-1].headers
    assert sent["x-title"] == "acme app" and sent["http-referer"] == "https://acme.example"
    assert "x-api-key" not in sent and key not in sent.get("authorization", "")


class CollectingEmitter:
    """The emitter's request-side interface, keeping what it is given."""

    accepting = True

    def __init__(self) -> None:
        self.events: list[UsageRecorded] = []

    def submit(self, event: UsageRecorded) -> None:
        self.events.append(event)

    def submit_later(self, build: Any) -> None:
        if (event := build()) is not None:
            self.events.append(event)


async def through_forward(
    upstream: Any, *, stream: bool
) -> tuple[httpx.Response, list[UsageRecorded]]:
    """One request through ``forward`` to an upstream answered by the function ``upstream``."""
    emitter = CollectingEmitter()
    # forward() reads only these of the gateway's resources (no admission: unlimited).
    resources: Any = SimpleNamespace(
        emitter=emitter,
        settings=SimpleNamespace(emit_usage=True),
        in_flight=InFlight(8),
        admission=None,
    )
    client = HttpxUpstream(
        base_url="http://u", timeout=5.0, transport=httpx.MockTransport(upstream)
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        call = Call(
            TenantKey("acme", "k1"), OPENAI, str(CHAT["model"]), CHAT, "req-x", datetime.now(UTC)
        )
        body = json.dumps(CHAT).encode()
        reply = await forward(resources, call, client, "/chat/completions", {}, body, stream=stream)
        await respond(reply, send, receive)

    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://g") as gateway:
            return await gateway.post("/relay"), emitter.events
    finally:
        await client.close()


def sse(*documents: object) -> bytes:
    return ("".join(f"data: {json.dumps(d)}\n\n" for d in documents) + "data: [DONE]\n\n").encode()


USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15, "cost": 0.00002}


async def test_a_compressed_stream_is_relayed_decoded_and_billed() -> None:
    body = sse({"choices": [{"delta": {"content": "hello there you"}}]}, {"usage": USAGE})
    headers = {"content-type": "text/event-stream", "content-encoding": "gzip"}
    relayed, events = await through_forward(
        lambda _: httpx.Response(200, content=gzip.compress(body), headers=headers), stream=True
    )
    assert relayed.content == body and "content-encoding" not in relayed.headers
    (event,) = events
    assert event.usage_source == "upstream" and event.usage.prompt_tokens == 12


async def test_a_client_gone_mid_stream_stops_the_relay_bills_once_and_frees_its_place() -> None:
    emitter = CollectingEmitter()
    in_flight = InFlight(8)
    resources: Any = SimpleNamespace(
        emitter=emitter,
        settings=SimpleNamespace(emit_usage=True),
        in_flight=in_flight,
        admission=None,
    )
    produced: list[int] = []

    async def endless() -> Any:
        for n in range(1000):
            produced.append(n)
            yield b'data: {"choices": [{"delta": {"content": "word "}}]}\n\n'
            await asyncio.sleep(0.002)

    def answer(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless(), headers={"content-type": "text/event-stream"})

    client = HttpxUpstream(base_url="http://u", timeout=5.0, transport=httpx.MockTransport(answer))
    call = Call(
        TenantKey("acme", "k1"), OPENAI, str(CHAT["model"]), CHAT, "req-x", datetime.now(UTC)
    )
    reply = await forward(resources, call, client, "/chat/completions", {}, b"{}", stream=True)
    assert in_flight.count == 1  # held while the stream is relayed
    sent: list[Any] = []
    gone = asyncio.Event()

    async def send(message: Any) -> None:
        sent.append(message)
        if len(sent) == 4:  # the head and three chunks reached the client, then it left
            gone.set()

    async def receive() -> dict[str, str]:
        await gone.wait()
        return {"type": "http.disconnect"}

    await respond(reply, send, receive)
    await client.close()
    assert len(produced) < 100  # the relay stopped, it did not read the stream to its end
    assert not any(m.get("more_body") is False for m in sent[1:])  # never "finished"
    assert in_flight.count == 0
    assert [e.usage_source for e in emitter.events] == ["estimated"]  # billed once
    assert emitter.events[0].usage.completion_tokens >= 3


async def test_a_malformed_chunk_neither_cuts_the_stream_nor_loses_the_usage() -> None:
    body = sse({"choices": 5}, {"choices": [{"delta": {"content": "fine"}}]}, {"usage": USAGE})
    relayed, events = await through_forward(
        lambda _: httpx.Response(200, content=body), stream=True
    )
    assert relayed.content == body
    (event,) = events
    assert event.usage_source == "upstream" and event.usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
async def test_a_2xx_error_with_nothing_generated_is_not_billed(stream: bool) -> None:
    failure = {"error": {"message": "provider overloaded", "code": 502}}
    content = sse(failure) if stream else json.dumps(failure).encode()
    relayed, events = await through_forward(
        lambda _: httpx.Response(200, content=content), stream=stream
    )
    assert relayed.status_code == 200 and events == []


async def test_unreadable_usage_is_billed_from_an_estimate() -> None:
    broken = {"prompt_tokens": 5, "completion_tokens": -1}
    answer = {"choices": [{"message": {"content": "some words here"}}], "usage": broken}
    _, events = await through_forward(lambda _: httpx.Response(200, json=answer), stream=False)
    (event,) = events
    assert event.usage_source == "estimated" and event.usage.completion_tokens > 0


class BreaksOff(httpx.AsyncByteStream):
    async def __aiter__(self) -> Any:
        yield b'{"choices": [{"message": {"content": "par'
        raise httpx.ReadError("connection reset")


async def test_a_non_streamed_answer_that_breaks_off_is_502_and_billed_its_prompt() -> None:
    relayed, events = await through_forward(
        lambda _: httpx.Response(200, stream=BreaksOff()), stream=False
    )
    assert relayed.status_code == 502 and relayed.json()["error"]["code"] == 502
    (event,) = events
    assert event.usage_source == "estimated" and event.usage.completion_tokens == 0
    assert event.usage.prompt_tokens > 50


@pytest.mark.parametrize("stream", [False, True])
def test_past_its_capacity_the_gateway_refuses_at_once_and_recovers(
    database_url: str, tmp_path: Path, stream: bool
) -> None:
    key = asyncio.run(make_key(database_url))
    settings = Settings(
        data_dir=tmp_path,
        catalogue_sync=False,
        database_url=database_url,
        max_in_flight=1,
        openrouter_base_url="http://upstream.test/api/v1",
    )
    transport = httpx.ASGITransport(app=create_fake_upstream())
    auth = {"Authorization": f"Bearer {key}"}
    body = {**CHAT, "stream": stream}
    with TestClient(create_app(settings, upstream_transport=transport)) as client:
        slow = threading.Thread(
            target=client.post,
            args=("/v1/chat/completions",),
            kwargs={"json": body, "headers": auth | {"x-fake-latency-ms": "800"}},
        )
        slow.start()
        in_flight = client.app.state.resources.in_flight  # type: ignore[attr-defined]
        for _ in range(100):
            if in_flight.count:
                break
            time.sleep(0.01)
        refused = client.post("/v1/chat/completions", json=body, headers=auth)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["message"].startswith("the gateway is at capacity")
        slow.join()
        assert in_flight.count == 0  # the slow one, streamed or not, is done with
        assert client.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
    assert 'billing_proxy_refused_total{reason="overload"}' in generate_latest().decode()
