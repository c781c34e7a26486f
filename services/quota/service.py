"""The quota service: ``billing.costs.v1`` → balances, budget spend and alerts, exactly once.

The reference consumer of the cost topic's contract. Each batch's charges (one per
(``request_id``, ``revision``), ``delta_cost`` signed: a correction that lowers a cost
refunds), the spend sums, the alerts it crosses and the consumed offsets commit in one
PostgreSQL transaction (``adapters.quota.apply_charges``), so a crash or a replay changes
nothing. Alerts are written to an outbox in that transaction and published afterwards to
``billing.alerts.v1`` (and the webhook, ``alerts.py``): each is recorded once, and
published at least once (a crash between sending and marking it sent repeats it; its
``alert_id`` says which one it is). Every ``maintenance_seconds`` it posts what expired
grants left unused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError

from services.adapters import metrics
from services.adapters.consuming import (
    RETRYABLE,
    SeekToStored,
    dead_letter,
    mirror_offsets,
    tune_gc,
    wait_for_pool,
)
from services.adapters.kafka import make_consumer, make_producer
from services.adapters.quota import (
    QUOTA_CONSUMER,
    apply_charges,
    mark_published,
    post_expiries,
    unpublished_alerts,
)
from services.adapters.topics import Topics
from services.core.backoff import Backoff
from services.core.events import Position, UsagePriced, decode_priced
from services.quota.alerts import Webhook, deliver_webhooks

log = logging.getLogger("billing.quota")

GROUP = "billing-quota"
DEFAULT_LOW_FRACTION = Decimal("0.1")


class QuotaService:
    def __init__(
        self,
        bootstrap: str,
        database_url: str,
        *,
        topics: Topics | None = None,
        group: str = GROUP,
        batch_max: int = 5000,
        low_fraction: Decimal = DEFAULT_LOW_FRACTION,
        webhook: Webhook | None = None,
        maintenance_seconds: float = 30.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.database_url = database_url
        self.topics = topics or Topics()
        self.group = group
        self.batch_max = batch_max
        self.low_fraction = low_fraction
        self.webhook = webhook
        self.maintenance_seconds = maintenance_seconds

    async def run(self, stop: asyncio.Event) -> None:
        pool = await wait_for_pool(self.database_url, stop)
        if pool is None:
            return
        tune_gc()
        consumer = make_consumer(
            self.bootstrap, group_id=self.group, max_poll_records=self.batch_max
        )
        listener = SeekToStored(consumer, pool, stop, QUOTA_CONSUMER)
        consumer.subscribe([self.topics.costs], listener=listener)
        producer = make_producer(self.bootstrap)
        await consumer.start()
        await producer.start()
        webhooks = None
        if self.webhook is not None:
            webhooks = asyncio.create_task(deliver_webhooks(pool, self.webhook, stop))
        log.info("charging %s to balances and budgets", self.topics.costs)
        maintained = -self.maintenance_seconds
        try:
            while not stop.is_set():
                if time.monotonic() - maintained >= self.maintenance_seconds:
                    await self._maintain(pool, producer)
                    maintained = time.monotonic()
                fetched = await consumer.getmany(timeout_ms=500, max_records=self.batch_max)
                positioned = listener.positioned
                records = [r for tp, batch in fetched.items() if tp in positioned for r in batch]
                if not records:
                    continue
                listener.idle.clear()
                try:
                    offsets, alerts = await self._handle(records, pool, producer, stop)
                finally:
                    listener.idle.set()
                await mirror_offsets(consumer, offsets)
                if alerts:
                    await self._publish(pool, producer)
        finally:
            if webhooks is not None:
                webhooks.cancel()
                await asyncio.gather(webhooks, return_exceptions=True)
            await consumer.stop()
            await producer.stop()
            await pool.close()

    async def _handle(
        self,
        records: list[ConsumerRecord],
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        stop: asyncio.Event,
    ) -> tuple[dict[tuple[str, int], int], int]:
        """Apply one batch (retried through database outages); return the offsets stored
        and how many new alerts it recorded."""
        events: list[UsagePriced] = []
        positions: list[Position] = []
        offsets: dict[tuple[str, int], int] = {}
        for record in records:
            offsets[(record.topic, record.partition)] = record.offset + 1
            try:
                events.append(decode_priced(record.value))
                positions.append(Position(record.topic, record.partition, record.offset))
            except Exception as exc:  # decoding is pure: whatever it raises, the message is bad
                reason = f"undecodable UsagePriced: {exc}"[:1000]
                await dead_letter(producer, self.topics.dlq, record, reason)
        metrics.BATCH_SIZE.labels("quota").observe(len(records))
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                async with pool.acquire() as connection:
                    result = await apply_charges(
                        connection, events, offsets, positions, low_fraction=self.low_fraction
                    )
                break
            except RETRYABLE as exc:
                delay = backoff.next()
                log.warning("database unavailable (%r); retrying the batch in %.1fs", exc, delay)
                if stop.is_set():
                    raise
                await asyncio.sleep(delay)
        metrics.CHARGES.inc(result.applied)
        metrics.ALERTS.inc(result.alerts)
        if events:
            newest = max(e.recorded_at for e in events)
            metrics.PIPELINE_LAG.labels("quota").set((datetime.now(UTC) - newest).total_seconds())
        return offsets, result.alerts

    async def _maintain(self, pool: asyncpg.Pool, producer: AIOKafkaProducer) -> None:
        """Post expired grants and publish what the outbox still holds; a failure is logged
        and tried next time."""
        try:
            async with pool.acquire() as connection:
                expired = await post_expiries(connection, datetime.now(UTC))
            if expired:
                log.info("posted %d expired grants", expired)
        except (*RETRYABLE, asyncpg.PostgresError) as exc:
            log.warning("posting expired grants failed (%r); trying again later", exc)
        await self._publish(pool, producer)

    async def _publish(self, pool: asyncpg.Pool, producer: AIOKafkaProducer) -> None:
        """Send the outbox's alerts to the alerts topic, then mark them sent."""
        try:
            async with pool.acquire() as connection:
                while batch := await unpublished_alerts(connection):
                    for _, tenant_id, event in batch:
                        await producer.send(self.topics.alerts, event, key=tenant_id.encode())
                    await producer.flush()
                    await mark_published(connection, [alert_id for alert_id, _, _ in batch])
                    log.info("published %d alerts", len(batch))
        except (*RETRYABLE, asyncpg.PostgresError, KafkaError) as exc:
            log.warning("publishing alerts failed (%r); trying again later", exc)
