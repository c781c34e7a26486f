"""POST /v1/usage against a real broker: acknowledged, per-item errors, 503 when away."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.adapters.kafka import ensure_topics
from services.adapters.settings import Settings
from services.adapters.topics import Topics
from services.core.events import decode_recorded
from services.gateway.app import create_app
from services.local.broker import EmbeddedBroker
from tests.integration.pipeline import read_records

pytestmark = pytest.mark.integration

ITEM = {
    "request_id": "r-1",
    "tenant_id": "acme",
    "api_key_id": "k-1",
    "provider": "openrouter",
    "provider_model_id": "anthropic/claude-sonnet-4.5",
    "occurred_at": "2026-11-28T10:00:00Z",
    "usage": {
        "prompt_tokens": 1800,
        "completion_tokens": 320,
        "prompt_tokens_details": {"cached_tokens": 600},
        "completion_tokens_details": {"reasoning_tokens": 24},
        "cost": "0.00858",
    },
    "metadata": {"route": "/v1/chat/completions"},
}


def gateway(tmp_path: Path, bootstrap: str, prefix: str) -> TestClient:
    settings = Settings(
        data_dir=tmp_path,
        catalogue_sync=False,
        kafka_bootstrap=bootstrap,
        topic_prefix=prefix,
        publish_timeout_seconds=8,
    )
    return TestClient(create_app(settings))


def wait_ready(client: TestClient, timeout: float = 20) -> None:
    for _ in range(int(timeout * 10)):
        if client.get("/readyz").status_code == 200:
            return
        asyncio.run(asyncio.sleep(0.1))
    pytest.fail(f"gateway not ready: {client.get('/readyz').json()}")


async def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 20) -> list[bytes]:
    """The values of ``topic``'s records (see ``read_records``)."""
    return [r.value for r in await read_records(bootstrap, topic, expected, timeout)]


@pytest.fixture
def topics(kafka_bootstrap: str, topic_prefix: str) -> Topics:
    named = Topics.named(topic_prefix)
    asyncio.run(ensure_topics(kafka_bootstrap, named.partitions()))
    return named


def test_a_batch_is_acknowledged_with_per_item_results(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, topics: Topics
) -> None:
    items = [
        ITEM,
        {**ITEM, "request_id": "r-2", "usage": {"prompt_tokens": -1}},
        {**ITEM, "request_id": "r-3"},
        {**ITEM, "request_id": "nul-\u0000"},
        {**ITEM, "request_id": "r-5", "format": []},
        {**ITEM, "request_id": "r-6", "occurred_at": "2999-01-01T00:00:00Z"},
        {**ITEM, "request_id": "r-7", "metadata": {f"k{i}": "v" for i in range(65)}},
    ]
    with gateway(tmp_path, kafka_bootstrap, topic_prefix) as client:
        wait_ready(client)
        response = client.post("/v1/usage", content=json.dumps(items))
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["accepted"], body["rejected"]) == (2, 5)
    fields = [r.get("field") for r in body["results"]]
    assert fields[1:] == [
        "usage.prompt_tokens",
        None,
        "request_id",
        "format",
        "occurred_at",
        "metadata",
    ]
    values = asyncio.run(read_all(kafka_bootstrap, topics.usage, 2))
    events = sorted((decode_recorded(v) for v in values), key=lambda e: e.request_id)
    assert [e.request_id for e in events] == ["r-1", "r-3"]
    first = events[0]
    assert first.usage.cache_read_tokens == 600 and first.usage.reasoning_tokens == 24
    assert first.reported is not None and str(first.reported.cost) == "0.00858"
    assert first.metadata == {"route": "/v1/chat/completions"}


def test_single_item_and_all_bad(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, topics: Topics
) -> None:
    with gateway(tmp_path, kafka_bootstrap, topic_prefix) as client:
        wait_ready(client)
        one = client.post("/v1/usage", json=ITEM)
        bad = client.post("/v1/usage", json=[{"request_id": "x"}])
        too_many = client.post("/v1/usage", json=[ITEM] * 1001)
        not_json = client.post("/v1/usage", content=b"{")
    assert one.status_code == 202 and one.json()["accepted"] == 1
    assert bad.status_code == 422 and bad.json()["results"][0]["status"] == "rejected"
    assert too_many.status_code == 413
    assert not_json.status_code == 400


def test_broker_down_answers_503_then_recovers(tmp_path: Path, topic_prefix: str) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log")
    broker.start()
    named = Topics.named(topic_prefix)
    asyncio.run(ensure_topics(broker.bootstrap, named.partitions()))
    try:
        with gateway(tmp_path, broker.bootstrap, topic_prefix) as client:
            wait_ready(client)
            assert client.post("/v1/usage", json=ITEM).status_code == 202
            broker.kill()
            down = client.post("/v1/usage", json={**ITEM, "request_id": "r-down"})
            assert down.status_code == 503
            assert down.headers["retry-after"] == "5"
            broker.start()  # memory storage: the topics must be made again
            asyncio.run(ensure_topics(broker.bootstrap, named.partitions()))
            for _ in range(100):
                again = client.post("/v1/usage", json={**ITEM, "request_id": "r-down"})
                if again.status_code == 202:
                    break
                asyncio.run(asyncio.sleep(0.2))
            assert again.status_code == 202
    finally:
        broker.stop()
