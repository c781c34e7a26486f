"""Contract tests of the ports the gateway uses, each run on the fake and the real adapter:
the event publisher (in memory / Kafka) and the tenant store (in memory / PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer

from services.adapters.database import connect, create_pool, migrate
from services.adapters.errors import PublishError
from services.adapters.kafka import ensure_topics, make_producer
from services.adapters.publisher import EventPublisher, InMemoryPublisher, KafkaPublisher
from services.adapters.tenants import (
    InMemoryTenantStore,
    PostgresTenantStore,
    TenantStore,
    create_key,
    create_tenant,
)
from services.core.events import UsageCounts, UsageRecorded, decode_recorded
from services.core.usage import Usage
from tests.integration.pipeline import read_records

pytestmark = pytest.mark.integration
NOW = datetime(2026, 11, 2, 12, tzinfo=UTC)


def event(n: int, tenant: str) -> UsageRecorded:
    usage = Usage(prompt_tokens=10, uncached_input_tokens=10, completion_tokens=n)
    return UsageRecorded(
        request_id=f"req-{n}",
        tenant_id=tenant,
        provider="openrouter",
        provider_model_id="openai/gpt-4o",
        occurred_at=NOW,
        recorded_at=NOW,
        usage=UsageCounts.of(usage),
    )


@pytest.fixture(params=["memory", "kafka"])
async def publisher_and_read(
    request: pytest.FixtureRequest, kafka_bootstrap: str, topic_prefix: str
) -> AsyncIterator[tuple[EventPublisher, str, object]]:
    topic = f"{topic_prefix}usage"
    if request.param == "memory":
        fake = InMemoryPublisher()

        async def read_memory(count: int) -> list[tuple[bytes, bytes]]:
            return [(k, v) for t, k, v in fake.records if t == topic]

        yield fake, topic, read_memory
        return
    await ensure_topics(kafka_bootstrap, {topic: 2})
    producer = make_producer(kafka_bootstrap)
    await producer.start()

    async def read_kafka(count: int) -> list[tuple[bytes, bytes]]:
        return [(r.key, r.value) for r in await read_records(kafka_bootstrap, topic, count)]

    try:
        yield KafkaPublisher(producer), topic, read_kafka
    finally:
        await producer.stop()


async def test_published_events_are_keyed_by_tenant_and_decode_back(
    publisher_and_read: tuple[EventPublisher, str, object],
) -> None:
    publisher, topic, read = publisher_and_read
    events = [event(n, "acme" if n % 2 else "globex") for n in range(6)]
    await publisher.publish(topic, events, timeout=10)
    records = await read(len(events))  # type: ignore[operator]
    assert len(records) == len(events)
    by_id = {decode_recorded(v).request_id: (k, decode_recorded(v)) for k, v in records}
    for sent in events:
        key, back = by_id[sent.request_id]
        assert key == sent.tenant_id.encode()
        assert back == sent


async def test_a_failed_publish_raises_publish_error() -> None:
    fake = InMemoryPublisher()
    fake.down = True
    with pytest.raises(PublishError):
        await fake.publish("t", [event(1, "acme")], timeout=1)
    assert fake.records == []


async def test_kafka_publisher_turns_a_timeout_into_publish_error(kafka_bootstrap: str) -> None:
    producer = make_producer(kafka_bootstrap)
    await producer.start()
    try:
        with pytest.raises(PublishError):
            await KafkaPublisher(producer).publish("any", [event(1, "acme")], timeout=0)
    finally:
        await producer.stop()


async def test_kafka_publisher_turns_a_broker_refusal_into_publish_error(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A record the client refuses to send (larger than it may send): a KafkaError."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=64)
    await producer.start()
    try:
        with pytest.raises(PublishError, match="MessageSizeTooLarge"):
            await KafkaPublisher(producer).publish(
                f"{topic_prefix}usage", [event(1, "acme")], timeout=10
            )
    finally:
        await producer.stop()


@pytest.fixture(params=["memory", "postgres"])
async def tenant_store(
    request: pytest.FixtureRequest, empty_database_url: str
) -> AsyncIterator[tuple[TenantStore, str, str]]:
    """A store holding tenant ``acme`` with one active key (returned) and one revoked."""
    if request.param == "memory":
        store = InMemoryTenantStore()
        key = store.add_key("acme", "k1")
        revoked = store.add_key("acme", "k2")
        store.revoke(revoked)
        yield store, key, revoked
        return
    await migrate(empty_database_url)
    connection = await connect(empty_database_url)
    try:
        await create_tenant(connection, "acme")
        _, key = await create_key(connection, "acme")
        revoked_id, revoked = await create_key(connection, "acme")
        await connection.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1", revoked_id
        )
    finally:
        await connection.close()
    pool = await create_pool(empty_database_url)
    try:
        yield PostgresTenantStore(pool), key, revoked
    finally:
        await pool.close()


async def test_tenant_store_authenticates_active_keys_only(
    tenant_store: tuple[TenantStore, str, str],
) -> None:
    store, key, revoked = tenant_store
    found = await store.authenticate(key)
    assert found is not None and found[0] == "acme"
    assert await store.authenticate(revoked) is None
    assert await store.authenticate("bk_nobody_x") is None
    assert await store.authenticate("") is None


async def test_tenant_store_finds_and_creates_unknown_tenants(
    tenant_store: tuple[TenantStore, str, str],
) -> None:
    store, _, _ = tenant_store
    assert await store.unknown(["acme", "initech"], create=False) == {"initech"}
    assert await store.unknown(["initech"], create=False) == {"initech"}  # still unknown
    assert await store.unknown(["acme", "initech"], create=True) == {"initech"}
    assert await store.unknown(["acme", "initech"], create=False) == set()
    assert await store.unknown(["initech"], create=True) == set()  # created once only
