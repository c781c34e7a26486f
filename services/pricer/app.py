"""The pricer: a faust-streaming worker from ``billing.usage.v1`` to ``billing.costs.v1``.

The worker hosts a plain aiokafka batch loop (``loop.BatchPricer``: fetch a batch, price
it, produce it, wait for acks=all, commit) instead of a faust agent: faust's per-message
stream machinery cost ~200 µs of CPU per event against ~45 µs for the pricing itself.
Faust's own Kafka consumer and producer are not started (``_NoKafka``); the worker gives
the process its lifecycle (signals, graceful stop, logging) and the re-drive timer.

Usage with no price goes to ``billing.usage.unpriced.v1`` and into ``unpriced_usage``; a
timer re-prices those rows when the price book changes. Nothing is ever billed at $0.

An unexpected exception inside a batch ends the process at once (``die``): the consumer's
position has moved past the batch, so carrying on could commit offsets of messages never
priced. The supervisor restarts it from the last committed offsets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
import mode
from faust.app.base import BootStrategy

from services.adapters import metrics
from services.adapters.consuming import PRICER_GROUP
from services.adapters.kafka import kafka_client_options
from services.adapters.pricing_cache import PricingCache
from services.adapters.topics import Topics
from services.core.events import Position
from services.pricer.logic import Incoming, Outcome, price_batch
from services.pricer.loop import BatchPricer
from services.pricer.unpriced import UnpricedStore

log = logging.getLogger("billing.pricer")

REDRIVE_SECONDS = 5.0


def faust_settings(
    bootstrap: str, data_dir: Path, kafka: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The worker's settings: no web server, no tables (they restore wrongly on Tansu), no
    Kafka clients of faust's own (the batch loop has them, see ``services.adapters.kafka``);
    the broker's TLS/SASL from ``kafka`` (default: ``kafka_client_options()``), so that any
    client faust makes connects as the batch loop's do."""
    return {
        "broker": f"kafka://{bootstrap}",
        "broker_credentials": broker_credentials(
            kafka_client_options() if kafka is None else kafka
        ),
        "store": "memory://",
        "topic_allow_declare": False,  # created explicitly, with their partition counts
        "web_enabled": False,
        "autodiscover": False,
        "worker_redirect_stdouts": False,
        "datadir": str(data_dir),
    }


def broker_credentials(kafka: Mapping[str, Any]) -> faust.types.auth.CredentialsT | None:
    """aiokafka's security options (``kafka_client_options``) as faust credentials."""
    protocol = kafka.get("security_protocol", "PLAINTEXT")
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(kafka["ssl_context"])
    return faust.SASLCredentials(  # SASL_SSL when given an SSL context
        username=kafka["sasl_plain_username"],
        password=kafka["sasl_plain_password"],
        mechanism=kafka["sasl_mechanism"],
        ssl_context=kafka.get("ssl_context"),
    )


def die(exc: BaseException) -> None:
    """Leave at once: nothing may commit past the batch that failed (module docstring)."""
    log.critical("fatal error while pricing a batch, exiting: %r", exc, exc_info=exc)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(70)


class _NoKafka(BootStrategy):  # type: ignore[misc]
    """Start no faust consumer, conductor or producer: ``BatchPricer`` has its own."""

    enable_kafka = False


def build_app(
    *,
    bootstrap: str,
    data_dir: Path,
    topics: Topics,
    prices: PricingCache,
    unpriced: UnpricedStore | None,
    app_id: str = PRICER_GROUP,
) -> faust.App:
    app = faust.App(app_id, **faust_settings(bootstrap, data_dir))
    app.boot_strategy = _NoKafka(app)
    pricer = BatchPricer(
        bootstrap, topics=topics, group=app_id, prices=prices, unpriced=unpriced, on_error=die
    )

    @app.service
    class Batches(mode.Service):  # type: ignore[misc]
        """The batch loop runs while the worker runs; stopping finishes the batch in flight."""

        async def on_start(self) -> None:
            await pricer.start()

        async def on_stop(self) -> None:
            await pricer.stop()

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
            await pricer.send(Outcome(priced=outcome.priced))  # acknowledged: then released
            await unpriced.release([e.request_id for e in outcome.priced])
            if outcome.priced:
                log.info("re-drove %d held usage events", len(outcome.priced))
                metrics.PRICED.inc(len(outcome.priced))
        except Exception:  # a timer must log and try again next time, never die silently
            log.exception("re-driving unpriced usage failed; will retry")

    return app


_NOWHERE = Position("unpriced_usage", -1, -1)


def run_worker(app: faust.App, loglevel: str = "info") -> None:
    """Run the faust worker in this process until SIGTERM/SIGINT (graceful: commits acks)."""
    loop = asyncio.new_event_loop()  # faust/mode expect a current loop; 3.10+ has none
    asyncio.set_event_loop(loop)
    worker = faust.Worker(app, loglevel=loglevel, loop=loop, redirect_stdouts=False, quiet=True)
    worker.spinner = None  # with a spinner, faust forces the root logger to DEBUG
    worker.execute_from_commandline()
