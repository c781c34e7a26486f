"""The pricer's consume loop: one aiokafka batch at a time, inside the faust worker.

Per batch: fetch up to ``batch_max`` records, price them (``price_batch``), hold the
unpriced usage in PostgreSQL, produce every outcome and wait for the broker's
acknowledgements (acks=all), and only then commit the batch's offsets: at-least-once, with
duplicates absorbed downstream by ``request_id`` + ``revision``. Faust's own stream did the
same per message at ~200 µs of CPU each; here the per-message cost is the pricing itself.

A partition is revoked only between batches (the rebalance listener waits for the batch in
flight), so a rebalance does not make another member re-read what was just produced.
Whatever fails inside a batch ends the process (``on_error``): the fetch position has
moved past the batch, so carrying on could commit offsets of messages never priced; a
restart resumes from the last committed offsets.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from services.adapters import metrics
from services.adapters.consuming import RESTART_TIMINGS, watch_lag
from services.adapters.kafka import make_consumer, make_producer
from services.adapters.pricing_cache import PricingCache
from services.adapters.publisher import encode
from services.adapters.topics import Topics, dead_letter_headers
from services.core.events import Position
from services.pricer.logic import Incoming, Outcome, price_batch
from services.pricer.unpriced import UnpricedStore

log = logging.getLogger("billing.pricer")

BATCH_MAX = 1000
FETCH_TIMEOUT_MS = 200


class _BetweenBatches(ConsumerRebalanceListener):  # type: ignore[misc]
    """Let partitions go only once the batch in flight is committed."""

    def __init__(self, busy: asyncio.Lock) -> None:
        self.busy = busy

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:  # noqa: ARG002
        async with self.busy:
            return

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        log.info("assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))


class BatchPricer:
    """Prices ``topics.usage`` into ``topics.costs`` (see the module docstring)."""

    producer: AIOKafkaProducer
    consumer: AIOKafkaConsumer

    def __init__(
        self,
        bootstrap: str,
        *,
        topics: Topics,
        group: str,
        prices: PricingCache,
        unpriced: UnpricedStore | None,
        batch_max: int = BATCH_MAX,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.topics = topics
        self.prices = prices
        self.unpriced = unpriced
        self.batch_max = batch_max
        self.on_error = on_error
        self.bootstrap = bootstrap
        self.group = group
        self._busy = asyncio.Lock()
        self._stop = asyncio.Event()
        self._running: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect (the clients belong to the running loop) and start the loop."""
        self.producer = make_producer(self.bootstrap)
        await self.producer.start()
        self.consumer = make_consumer(
            self.bootstrap,
            group_id=self.group,
            max_poll_records=self.batch_max,
            **RESTART_TIMINGS,  # a restarted pricer is not kept waiting on its dead self
        )
        self.consumer.subscribe([self.topics.usage], listener=_BetweenBatches(self._busy))
        await self.consumer.start()
        self._running = asyncio.create_task(self._run(), name="pricer-batches")
        self._watching = asyncio.create_task(
            watch_lag("pricer", self.bootstrap, [(self.topics.usage, self.group)], self._stop),
            name="pricer-lag",
        )

    async def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in flight (committed), then leave the group and flush."""
        self._stop.set()
        if self._running is None:
            return
        if self._watching is not None:  # a watch blocked on a dead broker must not hold us
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
        try:
            await asyncio.wait_for(asyncio.shield(self._running), timeout)
        except TimeoutError:
            self._running.cancel()  # its batch is not committed: re-read on restart
        await self.consumer.stop()
        await self.producer.stop()

    async def _run(self) -> None:
        try:
            while not self._stop.is_set():
                fetched = await self.consumer.getmany(
                    timeout_ms=FETCH_TIMEOUT_MS, max_records=self.batch_max
                )
                if fetched:
                    async with self._busy:
                        await self.handle(fetched)
        except Exception as exc:  # see the module docstring: never carry on past a batch
            if self.on_error is None:
                raise
            self.on_error(exc)

    async def handle(self, fetched: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """Price, produce and acknowledge one fetched batch, then commit its offsets."""
        owned = self.consumer.assignment()
        batch = [
            Incoming(r.key, r.value, Position(r.topic, r.partition, r.offset))
            for tp, records in fetched.items()
            if tp in owned  # revoked while it waited for the lock: the new owner reads it
            for r in records
        ]
        self.prices.poke()
        outcome = price_batch(batch, self.prices, now=datetime.now(UTC))
        if self.unpriced is not None and outcome.unpriced:
            await self.unpriced.hold(outcome.unpriced)
        await self.send(outcome)
        count(outcome, len(batch))
        offsets = {tp: records[-1].offset + 1 for tp, records in fetched.items() if tp in owned}
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # Produced and acknowledged, not committed: another member re-reads the batch
            # and the duplicates are absorbed downstream. Nothing is lost.
            log.warning(
                "commit after a batch of %d failed (%r); it may be re-read", len(batch), exc
            )

    async def send(self, outcome: Outcome) -> None:
        """Produce every outcome and return once the broker acknowledged them all."""
        produce = self.producer.send
        topics = self.topics
        pending: list[Awaitable[object]] = []
        for event in outcome.priced:
            key, value = encode(event)
            pending.append(await produce(topics.costs, value, key=key))
        for recorded, reason in outcome.unpriced:
            key, value = encode(recorded)
            headers = [("reason", reason.encode())]
            pending.append(await produce(topics.unpriced, value, key=key, headers=headers))
        for message, reason in outcome.dead:
            p = message.position
            headers = dead_letter_headers(p.topic, p.partition, p.offset, reason)
            pending.append(
                await produce(topics.dlq, message.value, key=message.key, headers=headers)
            )
        await asyncio.gather(*pending)


def count(outcome: Outcome, size: int) -> None:
    """Count a batch's outcomes in the pricer's metrics."""
    metrics.BATCH_SIZE.labels("pricer").observe(size)
    metrics.PRICED.inc(len(outcome.priced))
    metrics.UNPRICED.inc(len(outcome.unpriced))
    metrics.DEAD_LETTERED.labels("pricer").inc(len(outcome.dead))
    if outcome.priced:
        metrics.observe_handled("pricer", max(e.recorded_at for e in outcome.priced))
