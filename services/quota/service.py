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
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError

from services.adapters import metrics
from services.adapters.consuming import (
    RETRYABLE,
    Assignment,
    Offsets,
    consume_exactly_once,
    priced_batch,
    retried,
    tune_gc,
    wait_for_pool,
    watched_downstream,
)
from services.adapters.quota import (
    QUOTA_CONSUMER,
    ChargeResult,
    apply_charges,
    mark_published,
    post_expiries,
    unpublished_alerts,
)
from services.adapters.topics import Topics
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
        assignment: Assignment = "group",
    ) -> None:
        self.bootstrap = bootstrap
        self.database_url = database_url
        self.topics = topics or Topics()
        self.group = group
        self.batch_max = batch_max
        self.low_fraction = low_fraction
        self.webhook = webhook
        self.maintenance_seconds = maintenance_seconds
        self.assignment: Assignment = assignment
        """``group`` (share partitions with replicas) or ``all`` (every one, no group)."""

    async def run(self, stop: asyncio.Event) -> None:
        pool = await wait_for_pool(self.database_url, stop)
        if pool is None:
            return
        tune_gc()
        webhooks = None
        if self.webhook is not None:
            webhooks = asyncio.create_task(deliver_webhooks(pool, self.webhook, stop))
        log.info("charging %s to balances and budgets", self.topics.costs)

        async def handle(records: list[ConsumerRecord], producer: AIOKafkaProducer) -> Offsets:
            offsets, alerts = await self._handle(records, pool, producer, stop)
            if alerts:
                await self._publish(pool, producer)
            return offsets

        async def maintain(producer: AIOKafkaProducer) -> None:
            await self._maintain(pool, producer)

        try:
            await consume_exactly_once(
                bootstrap=self.bootstrap,
                group=self.group,
                topic=self.topics.costs,
                name=QUOTA_CONSUMER,
                pool=pool,
                stop=stop,
                handle=handle,
                batch_max=self.batch_max,
                maintain=maintain,
                maintenance_seconds=self.maintenance_seconds,
                lag=("quota", self._watched()),
                assignment=self.assignment,
            )
        finally:
            if webhooks is not None:
                webhooks.cancel()
                await asyncio.gather(webhooks, return_exceptions=True)
            await pool.close()

    def _watched(self) -> list[tuple[str, str]]:
        """What ``billing_pipeline_lag_seconds`` watches: the costs topic for this group
        and, upstream, the usage topic for the pricer's group (named like this one's)."""
        return watched_downstream(self.topics, self.group, GROUP)

    async def _handle(
        self,
        records: list[ConsumerRecord],
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        stop: asyncio.Event,
    ) -> tuple[Offsets, int]:
        """Apply one batch (retried through database outages); return the offsets stored
        and how many new alerts it recorded."""
        batch = await priced_batch(records, producer, self.topics.dlq)
        metrics.BATCH_SIZE.labels("quota").observe(len(records))

        async def attempt() -> ChargeResult:
            async with pool.acquire() as connection:
                return await apply_charges(
                    connection,
                    batch.events,
                    batch.offsets,
                    batch.positions,
                    low_fraction=self.low_fraction,
                )

        result = await retried(attempt, stop)
        metrics.CHARGES.inc(result.applied)
        metrics.ALERTS.inc(result.alerts)
        if batch.events:
            metrics.observe_handled("quota", max(e.recorded_at for e in batch.events))
        return batch.offsets, result.alerts

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
                    sent = [
                        await producer.send(self.topics.alerts, event, key=tenant_id.encode())
                        for _, tenant_id, event in batch
                    ]
                    await asyncio.gather(*sent)  # each acknowledged (or the first error)
                    await mark_published(connection, [alert_id for alert_id, _, _ in batch])
                    log.info("published %d alerts", len(batch))
        except (*RETRYABLE, asyncpg.PostgresError, KafkaError) as exc:
            log.warning("publishing alerts failed (%r); trying again later", exc)
