"""Usage emission off the request path: a bounded queue drained by one batching producer.

A proxied request puts its ``UsageRecorded`` on the queue and returns at once; the
background task sends batches to Kafka (acks=all) and, when the broker is away, keeps the
batch and retries with backoff rather than dropping it. Shutdown drains what is queued.
Not yet here (issue #4): the fsync'd local spool that outlives the process, and refusing
new requests when it is full.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.core.events import UsageRecorded
from services.gateway.ingest import publish
from services.runtime import metrics

log = logging.getLogger("billing.emitter")
SEND_TIMEOUT_SECONDS = 30.0


class Emitter:
    def __init__(
        self,
        producer: Callable[[], AIOKafkaProducer | None],
        topic: str,
        *,
        max_queue: int = 100_000,
        batch_max: int = 500,
    ) -> None:
        self._producer = producer
        self.topic = topic
        self.queue: asyncio.Queue[UsageRecorded] = asyncio.Queue(max_queue)
        self.batch_max = batch_max
        self.oldest_unsent: float | None = None
        self.in_flight = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def emit(self, event: UsageRecorded) -> None:
        """Queue one event (waits only if the queue is full: back-pressure, never a drop)."""
        if self.oldest_unsent is None:
            self.oldest_unsent = time.monotonic()
        await self.queue.put(event)

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.batch_max and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            self.in_flight = len(batch)
            await self._send(batch)
            self.in_flight = 0

    async def _send(self, batch: list[UsageRecorded]) -> None:
        delay = 0.2
        while True:
            producer = self._producer()
            try:
                if producer is None:
                    raise KafkaError("producer not connected")
                await publish(producer, self.topic, batch, SEND_TIMEOUT_SECONDS)
                metrics.INGESTED.inc(len(batch))
                self.oldest_unsent = None if self.queue.empty() else time.monotonic()
                return
            except (KafkaError, TimeoutError) as exc:
                log.warning("broker unavailable, holding %d usage events: %r", len(batch), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def observe(self) -> None:
        """Publish queue depth and the oldest unsent event's age to the metrics."""
        metrics.EMIT_QUEUE_DEPTH.set(self.queue.qsize() + self.in_flight)
        oldest = self.oldest_unsent
        metrics.EMIT_OLDEST_AGE.set(0 if oldest is None else time.monotonic() - oldest)

    async def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (bounded by ``timeout``), then stop."""
        deadline = time.monotonic() + timeout
        while (self.in_flight or not self.queue.empty()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._task is not None:
            self._task.cancel()
        unsent = self.in_flight + self.queue.qsize()
        if unsent:
            log.error("%d usage events were not sent before shutdown", unsent)
