"""Google's official ``google-genai`` SDK against the Gemini-native proxy, in-process.

The gateway runs in front of the fake upstream (as in ``test_gemini_proxy``); the SDK gets
the gateway's ``TestClient`` as its httpx client and the tenant's key, in each of the ways
a user would point it at a ``base_url``: the Gemini API with its default version (``v1``)
and with ``v1beta``, Vertex AI with a project and credentials (the key as a bearer token;
the SDK's default ``v1beta1`` and ``v1``) and Vertex AI express mode. Nothing reaches
Google: every URL the SDK builds starts with the ``base_url`` (the tests check the paths),
and the credentials already hold a token that never expires, so nothing is refreshed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from google import genai
from google.genai import errors, types
from google.oauth2.credentials import Credentials

from services.core.events import UsageRecorded
from tests.integration.test_gemini_proxy import GATEWAY_KEY, billed, gemini_gateway
from tests.integration.test_proxy import Setup

pytestmark = pytest.mark.integration

MODEL = "gemini-2.5-flash"
BASE_URL = "http://testserver"
PROMPT = "count the tokens " * 30
KNOBS = {"x-fake-reasoning-tokens": "6", "x-fake-cached-tokens": "20"}


@dataclass(frozen=True)
class Mode:
    """One way of configuring the SDK, and the path it then posts to (before ``:action``)."""

    name: str
    options: dict[str, Any]
    api_version: str | None
    path: str


VERTEX = "/projects/acme-ml/locations/us-central1/publishers/google/models/" + MODEL
MODES = [
    Mode("gemini-default", {}, None, f"/v1/models/{MODEL}"),
    Mode("gemini-v1beta", {}, "v1beta", f"/v1beta/models/{MODEL}"),
    Mode(
        "vertex",
        {"vertexai": True, "project": "acme-ml", "location": "us-central1"},
        None,
        "/v1beta1" + VERTEX,
    ),
    Mode(
        "vertex-v1",
        {"vertexai": True, "project": "acme-ml", "location": "us-central1"},
        "v1",
        "/v1" + VERTEX,
    ),
    Mode("vertex-express", {"vertexai": True}, None, f"/v1beta1/publishers/google/models/{MODEL}"),
]


@pytest.fixture
def setup(
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Setup]:
    # The SDK reads keys, projects, versions and mTLS switches from the environment.
    for name in list(os.environ):
        if name.startswith(("GOOGLE_", "GEMINI_")):
            monkeypatch.delenv(name)
    with gemini_gateway(database_url, kafka_bootstrap, topic_prefix, tmp_path) as running:
        yield running


def sdk(mode: Mode, key: str, http: TestClient) -> genai.Client:
    """The SDK as ``mode`` configures it, with ``key`` (the tenant's) as its credential and
    the gateway's in-process client (an httpx-compatible client the SDK accepts) for HTTP."""
    options = types.HttpOptions(
        base_url=BASE_URL, api_version=mode.api_version, headers=KNOBS, httpx_client=http
    )
    if "project" in mode.options:  # the SDK sends the credentials' token as a bearer token
        return genai.Client(
            **mode.options,
            credentials=Credentials(token=key),  # type: ignore[no-untyped-call]
            http_options=options,
        )
    return genai.Client(**mode.options, api_key=key, http_options=options)


def request_id(response: types.GenerateContentResponse) -> str:
    assert response.sdk_http_response is not None and response.sdk_http_response.headers
    return response.sdk_http_response.headers["x-billing-request-id"]


def assert_billed_as(
    event: UsageRecorded, usage: types.GenerateContentResponseUsageMetadata
) -> None:
    """The usage event against the ``usage_metadata`` the SDK returned."""
    assert event.tenant_id == "acme" and event.api_key_id
    assert event.provider_model_id == f"google/{MODEL}"
    assert (event.provider, event.usage_format, event.usage_source) == (
        "google-ai-studio",
        "gemini",
        "upstream",
    )
    assert usage.prompt_token_count and usage.candidates_token_count
    assert usage.thoughts_token_count == 6 and usage.cached_content_token_count == 20
    counts = event.usage
    assert counts.prompt_tokens == usage.prompt_token_count
    assert counts.cache_read_tokens == usage.cached_content_token_count
    # thoughts are outside candidatesTokenCount: counted once, inside completion
    assert counts.reasoning_tokens == usage.thoughts_token_count
    assert counts.completion_tokens == usage.candidates_token_count + usage.thoughts_token_count
    assert counts.prompt_tokens + counts.completion_tokens == usage.total_token_count


@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_json_and_streamed_answers_are_billed_as_the_sdk_saw_them(
    setup: Setup, kafka_bootstrap: str, mode: Mode
) -> None:
    http, transport, key, topics = setup
    sent: list[Any] = []  # requests of the TestClient's HTTP library
    http.event_hooks = {"request": [sent.append], "response": []}
    client = sdk(mode, key, http)

    plain = client.models.generate_content(model=MODEL, contents=PROMPT)
    streamed = list(client.models.generate_content_stream(model=MODEL, contents=PROMPT))

    # The SDK posted where this mode puts it, with the tenant key where this mode puts it.
    assert [(r.url.path, r.url.params.get("alt")) for r in sent] == [
        (f"{mode.path}:generateContent", None),
        (f"{mode.path}:streamGenerateContent", "sse"),
    ]
    for request in sent:
        if "project" in mode.options:
            assert request.headers["authorization"] == f"Bearer {key}"
        else:
            assert request.headers["x-goog-api-key"] == key
    assert plain.text
    assert len(streamed) > 1 and "".join(chunk.text or "" for chunk in streamed)
    assert plain.usage_metadata is not None
    usages = [
        c.usage_metadata
        for c in streamed
        if c.usage_metadata and c.usage_metadata.prompt_token_count
    ]
    assert len(usages) == 1 and usages[0] is streamed[-1].usage_metadata

    events = billed(kafka_bootstrap, topics, 2)
    assert request_id(plain) != request_id(streamed[-1])
    assert_billed_as(events[request_id(plain)], plain.usage_metadata)
    assert_billed_as(events[request_id(streamed[-1])], usages[0])

    # Whatever the SDK's version and shape, the gateway called its own upstream, its own way.
    assert [str(r.url) for r in transport.requests] == [
        f"http://gemini.test/v1beta/models/{MODEL}:generateContent",
        f"http://gemini.test/v1beta/models/{MODEL}:streamGenerateContent?alt=sse",
    ]
    for request in transport.requests:
        assert request.headers["x-goog-api-key"] == GATEWAY_KEY
        assert "authorization" not in request.headers


@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_an_unknown_key_is_refused_before_the_upstream(setup: Setup, mode: Mode) -> None:
    http, transport, _, _ = setup
    client = sdk(mode, "bk_0_unknown", http)
    with pytest.raises(errors.ClientError) as refused:
        client.models.generate_content(model=MODEL, contents=PROMPT)
    assert refused.value.code == 401
    with pytest.raises(errors.ClientError) as refused_stream:
        list(client.models.generate_content_stream(model=MODEL, contents=PROMPT))
    assert refused_stream.value.code == 401
    assert transport.requests == []
