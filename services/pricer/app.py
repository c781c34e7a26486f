"""The pricer: a faust-streaming agent from ``billing.usage.v1`` to ``billing.costs.v1``.

The agent takes batches of events (``take_events``: each keeps its topic/partition/offset
for dead letters), prices them with the core through the ``PricingCache``, sends every
outcome and waits for the broker's acknowledgement before asking for the next batch; only
then does faust mark the batch's offsets for commit (at-least-once; duplicates are absorbed
downstream by ``request_id`` + ``revision``).

Usage with no price goes to ``billing.usage.unpriced.v1`` and into ``unpriced_usage``; a
timer re-prices those rows when the price book changes. Nothing is ever billed at $0.

An unexpected exception must not escape the agent: faust would acknowledge the batch in
``take_events``'s ``finally`` and keep draining the partition, committing offsets of
messages never priced. The process exits at once instead and the supervisor restarts it
from the last committed offsets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust

from services.adapters import metrics
from services.adapters.kafka import FETCH_MAX_WAIT_MS
from services.adapters.pricing_cache import PricingCache
from services.adapters.publisher import encode
from services.adapters.topics import Topics, dead_letter_headers
from services.core.events import Position
from services.pricer.logic import Incoming, Outcome, price_batch
from services.pricer.unpriced import UnpricedStore

log = logging.getLogger("billing.pricer")

BATCH_MAX = 1000
BATCH_WITHIN_SECONDS = 0.2
REDRIVE_SECONDS = 5.0


def faust_settings(bootstrap: str, data_dir: Path) -> dict[str, Any]:
    """Settings that work on Tansu as well as on Apache Kafka (measured; see README)."""
    return {
        "broker": f"kafka://{bootstrap}",
        # Join time is half the session timeout on Tansu: ~3 s instead of ~30 s.
        "broker_session_timeout": 6.0,
        "broker_heartbeat_interval": 0.5,
        "broker_rebalance_timeout": 2.0,
        "broker_commit_interval": 0.5,
        "broker_request_timeout": 30.0,
        # exactly_once needs Kafka transactions, which Tansu gets wrong; correctness comes
        # from deduplication downstream instead.
        "processing_guarantee": "at_least_once",
        "producer_acks": -1,
        # faust's defaults (no linger, 16 KiB batches) sent almost one request per message.
        "producer_linger": 0.005,
        "producer_max_batch_size": 262_144,
        "consumer_auto_offset_reset": "earliest",
        "key_serializer": "raw",
        "value_serializer": "raw",
        "topic_allow_declare": False,  # created explicitly, with their partition counts
        "topic_disable_leader": True,
        "stream_wait_empty": True,
        "store": "memory://",  # no tables: they restore wrongly on Tansu
        "web_enabled": False,
        "autodiscover": False,
        "worker_redirect_stdouts": False,
        "datadir": str(data_dir),
    }


def die(exc: BaseException) -> None:
    """Leave without letting faust acknowledge the batch in flight (see module docstring)."""
    log.critical("fatal error while pricing a batch, exiting: %r", exc, exc_info=exc)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(70)


def build_app(
    *,
    bootstrap: str,
    data_dir: Path,
    topics: Topics,
    prices: PricingCache,
    unpriced: UnpricedStore | None,
    app_id: str = "billing-pricer",
) -> faust.App:
    app = faust.App(app_id, **faust_settings(bootstrap, data_dir))
    usage_topic = app.topic(topics.usage, key_serializer="raw", value_serializer="raw")

    async def send(outcome: Outcome) -> None:
        # app.producer.send, not Topic.send: the latter yields to the loop three times per
        # message (measured 8x slower); faust still flushes the producer before committing.
        produce = app.producer.send
        pending = [
            await produce(topics.costs, *encode(e), None, None, None) for e in outcome.priced
        ]
        for recorded, reason in outcome.unpriced:
            headers = [("reason", reason.encode())]
            pending.append(await produce(topics.unpriced, *encode(recorded), None, None, headers))
        for message, reason in outcome.dead:
            p = message.position
            headers = dead_letter_headers(p.topic, p.partition, p.offset, reason)
            pending.append(
                await produce(topics.dlq, message.key, message.value, None, None, headers)
            )
        await asyncio.gather(*pending)  # acknowledged by the broker (acks=all)

    @app.agent(usage_topic)  # type: ignore[untyped-decorator]
    async def pricer(stream: faust.StreamT[bytes]) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_SECONDS):
            try:
                batch = [
                    Incoming(
                        e.key,
                        e.value,
                        Position(e.message.topic, e.message.partition, e.message.offset),
                    )
                    for e in events
                ]
                prices.poke()
                outcome = price_batch(batch, prices, now=datetime.now(UTC))
                if unpriced is not None and outcome.unpriced:
                    await unpriced.hold(outcome.unpriced)
                await send(outcome)
                _count(outcome, len(batch))
            except Exception as exc:  # see die(): never let faust acknowledge this batch
                die(exc)

    @app.timer(interval=REDRIVE_SECONDS)  # type: ignore[untyped-decorator]
    async def redrive() -> None:
        """Price held usage whose model now has a price."""
        if unpriced is None:
            return
        try:
            # Corrections and overrides arrive from other processes: look before scanning.
            await asyncio.to_thread(prices.book.reload)
            held = await unpriced.candidates(prices, prices.book)
            if not held:
                return
            outcome = price_batch(
                [Incoming(None, r.model_dump_json().encode(), _NOWHERE) for r in held],
                prices,
                now=datetime.now(UTC),
            )
            await send(Outcome(priced=outcome.priced))
            await unpriced.release([e.request_id for e in outcome.priced])
            if outcome.priced:
                log.info("re-drove %d held usage events", len(outcome.priced))
                metrics.PRICED.inc(len(outcome.priced))
        except Exception:  # a timer must log and try again next time, never die silently
            log.exception("re-driving unpriced usage failed; will retry")

    return app


_NOWHERE = Position("unpriced_usage", -1, -1)


def _count(outcome: Outcome, size: int) -> None:
    metrics.BATCH_SIZE.labels("pricer").observe(size)
    metrics.PRICED.inc(len(outcome.priced))
    metrics.UNPRICED.inc(len(outcome.unpriced))
    metrics.DEAD_LETTERED.labels("pricer").inc(len(outcome.dead))
    if outcome.priced:
        newest = max(e.recorded_at for e in outcome.priced)
        metrics.PIPELINE_LAG.labels("pricer").set((datetime.now(UTC) - newest).total_seconds())


def _short_fetch_wait() -> None:
    """faust-streaming 0.15.3 hard-codes ``fetch_max_wait_ms=1500`` for its worker consumer;
    on Tansu that is up to 1.5 s of latency per hop (see ``kafka.FETCH_MAX_WAIT_MS``). Set
    ours on the consumer faust creates, before it starts (aiokafka reads it in ``start()``)."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    create = AIOKafkaConsumerThread._create_worker_consumer
    if getattr(create, "_billing_patched", False):
        return

    def create_with_short_wait(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer

    create_with_short_wait._billing_patched = True  # type: ignore[attr-defined]
    AIOKafkaConsumerThread._create_worker_consumer = create_with_short_wait


def run_worker(app: faust.App, loglevel: str = "info") -> None:
    """Run the faust worker in this process until SIGTERM/SIGINT (graceful: commits acks)."""
    _short_fetch_wait()
    loop = asyncio.new_event_loop()  # faust/mode expect a current loop; 3.10+ has none
    asyncio.set_event_loop(loop)
    worker = faust.Worker(app, loglevel=loglevel, loop=loop, redirect_stdouts=False, quiet=True)
    worker.spinner = None  # with a spinner, faust forces the root logger to DEBUG
    worker.execute_from_commandline()
