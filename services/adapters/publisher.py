"""Publishing events: the one place an event becomes a Kafka record.

Every event of this system is keyed by its ``tenant_id`` (one tenant's events stay in order
on one partition, so a quota service keeps running totals without merging partitions) and
carried as its JSON document. :func:`encode` says that once; :class:`EventPublisher` is the
port the gateway, the jobs and the tests use, with a Kafka adapter and an in-memory fake
that behave alike (one contract suite runs on both: tests/integration/test_ports.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from services.adapters.errors import PublishError

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer


class KeyedEvent(Protocol):
    """What an event needs to be published: its tenant and its JSON document."""

    @property
    def tenant_id(self) -> str: ...

    def model_dump_json(self) -> str: ...


def encode(event: KeyedEvent) -> tuple[bytes, bytes]:
    """(key, value) of an event's record: ``tenant_id`` and the event's JSON."""
    return event.tenant_id.encode(), event.model_dump_json().encode()


class EventPublisher(Protocol):
    """Sends events to a topic and returns once the broker acknowledged every one."""

    async def publish(self, topic: str, events: Sequence[KeyedEvent], timeout: float) -> None:
        """Raise :class:`PublishError` when not all were acknowledged within ``timeout``
        seconds (some may have been: consumers de-duplicate on ``request_id``)."""
        ...


class KafkaPublisher:
    """:class:`EventPublisher` over an aiokafka producer (acks=all, see ``kafka.py``)."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def publish(self, topic: str, events: Sequence[KeyedEvent], timeout: float) -> None:
        from aiokafka.errors import KafkaError

        try:
            async with asyncio.timeout(timeout):
                pending = []
                for event in events:
                    key, value = encode(event)
                    pending.append(await self.producer.send(topic, value, key=key))
                await asyncio.gather(*pending)
        except (KafkaError, TimeoutError) as exc:
            raise PublishError(f"{topic}: {exc!r}") from exc

    async def stop(self) -> None:
        await self.producer.stop()


class InMemoryPublisher:
    """:class:`EventPublisher` that keeps the records (tests); ``down`` makes it fail and
    ``hang`` makes a publish wait until its timeout, as a broker that went away mid-send."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes]] = []
        self.down = False
        self.hang = False

    async def publish(self, topic: str, events: Sequence[KeyedEvent], timeout: float) -> None:
        if self.down:
            raise PublishError(f"{topic}: broker away")
        if self.hang:
            await asyncio.sleep(timeout)
            raise PublishError(f"{topic}: no acknowledgement within {timeout}s")
        self.records.extend((topic, *encode(e)) for e in events)

    def values(self, topic: str | None = None) -> list[bytes]:
        return [v for t, _, v in self.records if topic is None or t == topic]
