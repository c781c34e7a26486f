"""The projector process: consume ``billing.costs.v1`` in batches, apply each exactly once.

Exactly-once comes from PostgreSQL, not from Kafka: a batch's rows and its offsets commit in
one transaction, and on (re)assignment each partition is positioned at the offset stored
there. A database outage stalls the loop (the batch is retried with backoff) rather than
losing or skipping anything; undecodable messages go to the dead-letter topic first.
Between batches, at start and then hourly, it keeps the monthly partitions of
``billing_transactions`` ahead of time and retires months past the retention setting
(``services.adapters.partitions``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaProducer, ConsumerRecord

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
from services.adapters.partitions import (
    RetentionAction,
    create_partitions,
    months_ahead,
    retention_cutoff,
    retire,
)
from services.adapters.readmodels import PROJECTOR_CONSUMER
from services.adapters.spend_minutes import prune_minutes
from services.adapters.topics import Topics
from services.projector.apply import BatchResult, apply_batch

log = logging.getLogger("billing.projector")

DEFAULT_TOPICS = Topics()
GROUP = "billing-projector"
MAINTENANCE_SECONDS = 3600.0
"""How often partitions are created ahead and old months retired (and once at start)."""


class Projector:
    def __init__(
        self,
        bootstrap: str,
        database_url: str,
        *,
        topics: Topics = DEFAULT_TOPICS,
        group: str = GROUP,
        batch_max: int = 5000,
        retry_max_seconds: float = 5.0,
        retention_months: int | None = None,
        retention_action: RetentionAction = "detach",
        assignment: Assignment = "group",
    ) -> None:
        self.bootstrap = bootstrap
        self.database_url = database_url
        self.topics = topics
        self.group = group
        self.batch_max = batch_max
        self.retry_max_seconds = retry_max_seconds
        self.retention_months = retention_months
        self.retention_action: RetentionAction = retention_action
        self.assignment: Assignment = assignment
        """``group`` (share partitions with replicas) or ``all`` (every one, no group)."""

    async def run(self, stop: asyncio.Event) -> None:
        pool = await wait_for_pool(self.database_url, stop)
        if pool is None:
            return
        tune_gc()
        log.info("projecting %s into PostgreSQL", self.topics.costs)

        async def handle(records: list[ConsumerRecord], producer: AIOKafkaProducer) -> Offsets:
            return await self._handle(records, pool, producer, stop)

        async def maintain(_: AIOKafkaProducer) -> None:
            await self._maintain(pool)

        try:
            await consume_exactly_once(
                bootstrap=self.bootstrap,
                group=self.group,
                topic=self.topics.costs,
                name=PROJECTOR_CONSUMER,
                pool=pool,
                stop=stop,
                handle=handle,
                batch_max=self.batch_max,
                maintain=maintain,
                maintenance_seconds=MAINTENANCE_SECONDS,
                lag=("projector", self._watched()),
                assignment=self.assignment,
            )
        finally:
            await pool.close()

    def _watched(self) -> list[tuple[str, str]]:
        """What ``billing_pipeline_lag_seconds`` watches: the costs topic for this group
        and, upstream, the usage topic for the pricer's group (named like this one's)."""
        return watched_downstream(self.topics, self.group, GROUP)

    async def _maintain(self, pool: asyncpg.Pool) -> None:
        """Partitions ahead, old months retired, old minutes dropped; a failure is logged
        and tried next time."""
        now = datetime.now(UTC)
        try:
            async with pool.acquire() as connection:
                await create_partitions(connection, months_ahead(now))
                await prune_minutes(connection, now)
                if self.retention_months is not None:
                    cutoff = retention_cutoff(now, self.retention_months)
                    await retire(connection, cutoff, self.retention_action)
        except (*RETRYABLE, asyncpg.PostgresError) as exc:
            log.warning("partition maintenance failed (%r); trying again later", exc)

    async def _handle(
        self,
        records: list[ConsumerRecord],
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        stop: asyncio.Event,
    ) -> Offsets:
        """Apply one batch (retrying through database outages); return the offsets stored."""
        batch = await priced_batch(records, producer, self.topics.dlq)
        events, offsets = batch.events, batch.offsets
        metrics.BATCH_SIZE.labels("projector").observe(len(records))
        started = 0.0

        async def attempt() -> BatchResult:
            nonlocal started
            started = time.perf_counter()
            async with pool.acquire() as connection:
                return await apply_batch(
                    connection, PROJECTOR_CONSUMER, events, offsets, batch.positions
                )

        result = await retried(attempt, stop, self.retry_max_seconds)
        metrics.DB_WRITE_SECONDS.observe(time.perf_counter() - started)
        metrics.PROJECTED.inc(result.inserted + result.revised)
        metrics.DUPLICATES.inc(result.duplicates)
        metrics.RETIRED_SKIPPED.inc(result.retired)
        if result.retired:
            log.warning(
                "%d events of retired months not applied (their totals are frozen; the log "
                "keeps them)",
                result.retired,
            )
        if events:
            metrics.observe_handled("projector", max(e.recorded_at for e in events))
        return offsets
