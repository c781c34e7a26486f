"""The proxy routes' front (``gateway/front.py``): what it answers before and around the
forwarder, and how the OpenAPI document describes routes FastAPI does not serve."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from services.adapters.settings import Settings
from services.adapters.tenants import key_hash
from services.gateway import front, proxy
from services.gateway.app import create_app
from services.gateway.keys import TenantKey
from services.local.fake_upstream import create_fake_upstream
from tests.integration.test_proxy import CHAT, Recording

pytestmark = pytest.mark.integration

KEY = "bk_front_test_key"


def gateway(
    tmp_path: Path, answer: httpx.AsyncBaseTransport | None = None
) -> tuple[TestClient, Recording]:
    """The gateway with no database (its one key is put in the key cache by the test), before
    the fake upstream or ``answer``."""
    upstream = Recording(answer or httpx.ASGITransport(app=create_fake_upstream()))
    settings = Settings(
        data_dir=tmp_path,
        catalogue_sync=False,
        database_url=None,
        kafka_bootstrap=None,
        openrouter_base_url="http://upstream.test/api/v1",
    )
    return TestClient(create_app(settings, upstream_transport=upstream)), upstream


def known_key(client: TestClient) -> dict[str, str]:
    resources = client.app.state.resources  # type: ignore[attr-defined]
    resources.key_cache.ttl = 600.0
    resources.key_cache.put(key_hash(KEY), TenantKey("acme", "k1"))
    return {"Authorization": f"Bearer {KEY}"}


def test_another_method_on_the_chat_route_is_a_405_in_the_sdk_shape(tmp_path: Path) -> None:
    client, upstream = gateway(tmp_path)
    with client:
        answer = client.get("/v1/chat/completions", headers=known_key(client))
    assert answer.status_code == 405 and answer.headers["allow"] == "POST"
    assert answer.json()["error"] == {
        "message": "only POST is allowed on /v1/chat/completions",
        "type": "invalid_request_error",
        "code": 405,
        "status": "FAILED_PRECONDITION",
    }
    assert upstream.requests == []


def test_another_method_on_a_gemini_route_is_a_405_but_get_models_is_fastapis(
    tmp_path: Path,
) -> None:
    client, upstream = gateway(tmp_path)
    with client:
        headers = known_key(client)
        vertex = "/v1beta1/publishers/google/models/gemini-2.5-flash:generateContent"
        for path in ("/v1beta/models/gemini-2.5-flash:generateContent", vertex):
            answer = client.get(path, headers=headers)
            assert answer.status_code == 405 and answer.headers["allow"] == "POST", path
            assert answer.json()["error"]["code"] == 405
        model = client.get("/v1/models/nobody/no-such-model", headers=headers)
    assert model.status_code == 404  # the models route answered, not the proxy
    assert model.json()["error"]["message"] == "no priced model 'nobody/no-such-model'"
    assert upstream.requests == []


def test_a_stream_whose_usage_cannot_be_read_still_frees_its_place_and_bills(
    tmp_path: Path,
) -> None:
    # A data line nested deeper than any JSON reader goes: orjson refuses it, json recurses.
    deep = b"data: " + b"[" * 1100 + b"]" * 1100 + b"\n\n"

    def upstream_answer(_: httpx.Request) -> httpx.Response:
        body = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n' + deep
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    client, _ = gateway(tmp_path, httpx.MockTransport(upstream_answer))
    with client:
        headers = known_key(client)
        resources = client.app.state.resources  # type: ignore[attr-defined]
        answer = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers)
        assert answer.status_code == 200 and answer.content.endswith(b"]\n\n")
        assert resources.in_flight.count == 0
        for _ in range(200):  # the estimate is built off the request path
            if resources.emitter.depth == 0 and resources.emitter.spool.size_bytes:
                break
            time.sleep(0.02)
        spool = resources.emitter.spool
        spooled = [e for path in spool.segments() for batch in spool.read(path, 100) for e in batch]
    assert [(e.usage_source, e.usage.completion_tokens > 0) for e in spooled] == [
        ("estimated", True)
    ]


def test_without_a_key_database_the_proxy_is_a_503_not_a_crash(tmp_path: Path) -> None:
    client, upstream = gateway(tmp_path)
    with client:
        answer = client.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer x"}
        )
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["message"] == "no database is configured for API keys"
    assert "www-authenticate" not in answer.headers
    assert upstream.requests == []


def test_an_unexpected_error_is_a_logged_500_in_the_sdk_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*_: Any) -> proxy.Reply:
        raise RuntimeError("a bug")

    monkeypatch.setattr(proxy, "chat_completions", broken)
    client, _ = gateway(tmp_path)
    with client:
        answer = client.post("/v1/chat/completions", json=CHAT, headers=known_key(client))
    assert answer.status_code == 500
    assert answer.json()["error"]["message"] == "internal error"
    assert "unhandled error on POST /v1/chat/completions" in caplog.text


def test_a_client_gone_while_sending_its_body_is_not_forwarded_nor_answered(
    tmp_path: Path,
) -> None:
    client, upstream = gateway(tmp_path)
    with client:
        headers = known_key(client)
        resources = client.app.state.resources  # type: ignore[attr-defined]  # no await uses it
        sent: list[Any] = []
        messages = iter([{"type": "http.request", "body": b'{"mod', "more_body": True},
                         {"type": "http.disconnect"}])  # fmt: skip

        async def receive() -> dict[str, Any]:
            return next(messages)

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "query_string": b"",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        }
        route = front.route_of(scope)
        assert route is not None
        asyncio.run(front.serve(route, resources, scope, receive, send))
        assert sent == [] and upstream.requests == []


def test_the_openapi_document_describes_the_proxy_routes(tmp_path: Path) -> None:
    client, _ = gateway(tmp_path)
    with client:
        document = client.get("/openapi.json").json()
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert "application/json" in chat["requestBody"]["content"]
    assert {"200", "400", "401", "402", "502", "503", "504"} <= chat["responses"].keys()
    error = chat["responses"]["401"]["content"]["application/json"]["schema"]["$ref"]
    assert document["components"]["schemas"][error.rsplit("/", 1)[1]]["required"] == ["error"]
    for path in (
        "/v1beta/models/{model_action}",
        "/v1/publishers/google/models/{model_action}",
        "/v1beta1/projects/{project}/locations/{location}/publishers/google/models/{model_action}",
    ):
        assert "post" in document["paths"][path], path
    assert "get" in document["paths"]["/v1/models/{model_id}"]  # FastAPI's own, still there
