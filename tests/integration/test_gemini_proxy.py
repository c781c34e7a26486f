"""The Gemini-native proxy in front of the fake upstream: billed from ``usageMetadata``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from services.adapters.settings import Settings
from services.adapters.topics import Topics
from services.core.events import UsageRecorded, decode_recorded
from services.gateway.gemini_target import gemini_target
from tests.integration.test_ingest import read_all
from tests.integration.test_proxy import Setup, gateway_before_fake_upstream

MODEL = "gemini-2.5-flash"
GENERATE = f"/v1beta/models/{MODEL}:generateContent"
STREAM = f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
BODY = {"contents": [{"role": "user", "parts": [{"text": "count the tokens " * 30}]}]}
GATEWAY_KEY = "gateway-vertex-key"
KNOBS = {"x-fake-reasoning-tokens": "6", "x-fake-cached-tokens": "20"}


def gemini_gateway(
    database_url: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> AbstractContextManager[Setup]:
    """The gateway before the fake upstream, sending Gemini calls to it with its own key."""
    return gateway_before_fake_upstream(
        database_url,
        kafka_bootstrap,
        topic_prefix,
        tmp_path,
        vertex_base_url="http://gemini.test/",
        vertex_api_key=SecretStr(GATEWAY_KEY),
    )


@pytest.fixture
def setup(
    database_url: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> Iterator[Setup]:
    with gemini_gateway(database_url, kafka_bootstrap, topic_prefix, tmp_path) as running:
        yield running


def chunks(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def billed(kafka_bootstrap: str, topics: Topics, expected: int) -> dict[str, UsageRecorded]:
    """The usage events on the topic, waiting a little past ``expected`` for extra ones."""
    values = asyncio.run(read_all(kafka_bootstrap, topics.usage, expected + 1, timeout=4))
    events = [decode_recorded(v) for v in values]
    assert len(events) == expected, [e.request_id for e in events]
    return {e.request_id: e for e in events}


@pytest.mark.integration
def test_generate_and_stream_are_billed_once_from_usage_metadata(
    setup: Setup, kafka_bootstrap: str
) -> None:
    client, transport, key, topics = setup
    plain = client.post(GENERATE, json=BODY, headers={"x-goog-api-key": key} | KNOBS)
    assert plain.status_code == 200
    plain_usage = plain.json()["usageMetadata"]
    streamed = client.post(STREAM, json=BODY, headers={"Authorization": f"Bearer {key}"} | KNOBS)
    assert streamed.status_code == 200
    stream_chunks = chunks(streamed.text)
    assert len(stream_chunks) > 1  # passed through chunk by chunk, not re-encoded
    stream_usage = stream_chunks[-1]["usageMetadata"]
    assert all("promptTokenCount" not in c["usageMetadata"] for c in stream_chunks[:-1])

    events = billed(kafka_bootstrap, topics, 2)
    for response, usage in ((plain, plain_usage), (streamed, stream_usage)):
        event = events[response.headers["x-billing-request-id"]]
        assert event.provider_model_id == f"google/{MODEL}"
        assert (event.provider, event.usage_format, event.usage_source) == (
            "google-ai-studio",
            "gemini",
            "upstream",
        )
        assert event.tenant_id == "acme" and event.api_key_id
        counts = event.usage
        assert counts.prompt_tokens == usage["promptTokenCount"]
        assert counts.cache_read_tokens == usage["cachedContentTokenCount"] == 20
        assert counts.uncached_input_tokens == usage["promptTokenCount"] - 20
        # thoughts are outside candidatesTokenCount: counted once, inside completion
        assert counts.reasoning_tokens == usage["thoughtsTokenCount"] == 6
        assert counts.completion_tokens == (
            usage["candidatesTokenCount"] + usage["thoughtsTokenCount"]
        )
        assert counts.prompt_tokens + counts.completion_tokens == usage["totalTokenCount"]

    # The gateway's own key went upstream, never the tenant's; streaming asked for SSE.
    sent_plain, sent_stream = transport.requests
    assert str(sent_plain.url) == f"http://gemini.test/v1beta/models/{MODEL}:generateContent"
    assert sent_stream.url.params["alt"] == "sse"
    for sent in transport.requests:
        assert sent.headers["x-goog-api-key"] == GATEWAY_KEY
        assert "authorization" not in sent.headers and "key" not in sent.url.params
        assert sent.headers["x-fake-reasoning-tokens"] == "6"  # other x- headers pass


@pytest.mark.integration
def test_missing_unknown_or_query_keys_never_reach_the_upstream(setup: Setup) -> None:
    client, transport, key, _ = setup
    for url, headers in (
        (GENERATE, {}),
        (GENERATE, {"x-goog-api-key": "bk_0_unknown"}),
        (STREAM, {"Authorization": "Bearer bk_0_unknown"}),
        (f"{GENERATE}?key={key}", {}),  # keys in URLs end up in logs: not accepted
    ):
        assert client.post(url, json=BODY, headers=headers).status_code == 401
    assert transport.requests == []


@pytest.mark.integration
def test_bad_requests_are_refused_before_the_upstream(setup: Setup) -> None:
    client, transport, key, _ = setup
    auth = {"x-goog-api-key": key}
    assert (
        client.post(f"/v1beta/models/{MODEL}:countTokens", json=BODY, headers=auth).status_code
        == 404
    )
    assert client.post(f"/v1beta/models/{MODEL}", json=BODY, headers=auth).status_code == 404
    assert client.post(GENERATE, content=b"[1, 2]", headers=auth).status_code == 400
    assert client.post(GENERATE, content=b"not json", headers=auth).status_code == 400
    no_sse = f"/v1beta/models/{MODEL}:streamGenerateContent"
    assert client.post(no_sse, json=BODY, headers=auth).status_code == 400
    nested = "/v1beta/models/publishers/google/x:generateContent"  # no paths into the upstream
    assert client.post(nested, json=BODY, headers=auth).status_code == 400
    assert transport.requests == []
    # a leading models/ (the resource name) is the same model
    ok = client.post(f"/v1beta/models/models/{MODEL}:generateContent", json=BODY, headers=auth)
    assert ok.status_code == 200
    assert transport.requests[0].url.path == f"/v1beta/models/{MODEL}:generateContent"


SDK_PREFIXES = (  # what google-genai posts to, before {model}:{action} (see test_genai_sdk)
    "/v1/models",
    "/v1beta/models",
    "/v1/projects/acme-ml/locations/us-central1/publishers/google/models",
    "/v1beta1/projects/acme-ml/locations/global/publishers/google/models",
    "/v1/publishers/google/models",
    "/v1beta1/publishers/google/models",
)


@pytest.mark.integration
def test_every_sdk_path_is_billed_and_sent_like_the_v1beta_route(
    setup: Setup, kafka_bootstrap: str
) -> None:
    client, transport, key, topics = setup
    ids = []
    for prefix in SDK_PREFIXES:
        answer = client.post(
            f"{prefix}/{MODEL}:generateContent", json=BODY, headers={"x-goog-api-key": key}
        )
        assert answer.status_code == 200, (prefix, answer.text)
        ids.append(answer.headers["x-billing-request-id"])

    events = billed(kafka_bootstrap, topics, len(SDK_PREFIXES))
    assert set(events) == set(ids)
    for event in events.values():
        assert event.provider_model_id == f"google/{MODEL}"
        assert (event.provider, event.usage_source) == ("google-ai-studio", "upstream")
        assert event.tenant_id == "acme"
    # the client's version, project and location pick the route, never the upstream URL
    assert {str(r.url) for r in transport.requests} == {
        f"http://gemini.test/v1beta/models/{MODEL}:generateContent"
    }


@pytest.mark.integration
def test_every_sdk_path_refuses_like_the_v1beta_route(setup: Setup) -> None:
    client, transport, key, _ = setup
    auth = {"x-goog-api-key": key}
    unknown = client.post(f"/v1beta/models/{MODEL}:countTokens", json=BODY, headers=auth)
    no_sse = client.post(f"/v1beta/models/{MODEL}:streamGenerateContent", json=BODY, headers=auth)
    for prefix in SDK_PREFIXES:
        same_404 = client.post(f"{prefix}/{MODEL}:countTokens", json=BODY, headers=auth)
        assert (same_404.status_code, same_404.json()) == (404, unknown.json())
        same_400 = client.post(f"{prefix}/{MODEL}:streamGenerateContent", json=BODY, headers=auth)
        assert (same_400.status_code, same_400.json()) == (400, no_sse.json())
        assert client.post(f"{prefix}/{MODEL}:generateContent", json=BODY).status_code == 401
        nested = f"{prefix}/publishers/google/models/{MODEL}:generateContent"
        assert client.post(nested, json=BODY, headers=auth).status_code == 400
    # only Google's models are billed as google/{model}: other publishers have no route
    other = "/v1beta1/projects/p/locations/l/publishers/anthropic/models/claude-x:rawPredict"
    assert client.post(other, json=BODY, headers=auth).status_code == 404
    other = "/v1/publishers/anthropic/models/claude-x:generateContent"
    assert client.post(other, json=BODY, headers=auth).status_code == 404
    assert transport.requests == []


@pytest.mark.integration
def test_upstream_errors_pass_through_unbilled(setup: Setup, kafka_bootstrap: str) -> None:
    client, _, key, topics = setup
    headers = {"x-goog-api-key": key, "x-fake-status": "500"}
    assert client.post(GENERATE, json=BODY, headers=headers).status_code == 500
    assert client.post(STREAM, json=BODY, headers=headers).status_code == 500
    assert asyncio.run(read_all(kafka_bootstrap, topics.usage, 1, timeout=3)) == []


@pytest.mark.integration
def test_a_cut_stream_is_billed_from_an_estimate(setup: Setup, kafka_bootstrap: str) -> None:
    client, _, key, topics = setup
    cut = client.post(STREAM, json=BODY, headers={"x-goog-api-key": key, "x-fake-cut-after": "3"})
    assert cut.status_code == 200 and len(chunks(cut.text)) == 3
    (event,) = billed(kafka_bootstrap, topics, 1).values()
    assert event.request_id == cut.headers["x-billing-request-id"]
    assert event.usage_source == "estimated" and event.provider_model_id == f"google/{MODEL}"
    assert event.usage.prompt_tokens > 0 and event.usage.completion_tokens > 0


def test_the_upstream_url_and_credentials_follow_the_settings() -> None:
    assert gemini_target(Settings()) is None

    ai_studio = gemini_target(
        Settings(
            vertex_base_url="https://generativelanguage.googleapis.com/",
            vertex_api_key=SecretStr("k1"),
            vertex_project="ignored-when-a-base-url-is-set",
        )
    )
    assert ai_studio is not None and ai_studio.provider == "google-ai-studio"
    assert ai_studio.url(MODEL, "generateContent") == (
        f"https://generativelanguage.googleapis.com/v1beta/models/{MODEL}:generateContent"
    )
    assert ai_studio.headers["x-goog-api-key"] == "k1"
    assert "authorization" not in ai_studio.headers

    regional = gemini_target(
        Settings(
            vertex_project="acme-ml",
            vertex_region="europe-west4",
            vertex_api_key=SecretStr("ya29.t"),
        )
    )
    assert regional is not None and regional.provider == "vertex"
    assert regional.url(MODEL, "streamGenerateContent") == (
        "https://europe-west4-aiplatform.googleapis.com/v1/projects/acme-ml/locations/"
        f"europe-west4/publishers/google/models/{MODEL}:streamGenerateContent"
    )
    assert regional.headers["authorization"] == "Bearer ya29.t"
    assert "x-goog-api-key" not in regional.headers
    worldwide = gemini_target(Settings(vertex_project="acme-ml", vertex_region="global"))
    assert worldwide is not None
    assert worldwide.url(MODEL, "generateContent").startswith(
        "https://aiplatform.googleapis.com/v1/projects/acme-ml/locations/global/"
    )

    express = gemini_target(Settings(vertex_api_key=SecretStr("k2")))
    assert express is not None and express.provider == "vertex"
    assert express.url(MODEL, "generateContent") == (
        f"https://aiplatform.googleapis.com/v1/publishers/google/models/{MODEL}:generateContent"
    )
    assert express.headers["x-goog-api-key"] == "k2"
