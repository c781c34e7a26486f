"""Everything the gateway holds open, in one typed object handed to the routes.

:meth:`Resources.open` opens the pricing cache (its first refresh starts in the
background), the database pool and tenant store, the upstream clients, the usage
emitter and its spool, and (in the background, retried while the broker is away) the event
publisher; on the way out the emitter sends or spools what it holds before anything else
is closed.
FastAPI routes receive the object through the :data:`Deps` dependency and the proxy front
(``front.py``) from the app's state; nothing else reads ``app.state``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import httpx
from fastapi import Depends, HTTPException, Request

from services.adapters.database import create_pool
from services.adapters.kafka import make_producer
from services.adapters.pricing_cache import PricingCache
from services.adapters.publisher import EventPublisher, KafkaPublisher
from services.adapters.settings import Settings
from services.adapters.tenants import PostgresTenantStore, TenantStore
from services.adapters.topics import Topics
from services.adapters.wiring import pricing_cache
from services.core.backoff import Backoff
from services.gateway import tokens
from services.gateway.admission import Admission
from services.gateway.dashboard.state import Dashboard
from services.gateway.emitter import Emitter
from services.gateway.gemini_target import GeminiTarget, gemini_target
from services.gateway.keys import KeyCache
from services.gateway.spool import claim
from services.gateway.upstream import AiohttpUpstream, HttpxUpstream, Upstream

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("billing.gateway")


@dataclass(slots=True)
class Resources:
    """What the routes use; ``publisher`` is ``None`` until the broker is reached."""

    settings: Settings
    prices: PricingCache
    topics: Topics
    emitter: Emitter
    upstream: Upstream
    """OpenRouter (or any OpenAI-compatible upstream): relative URLs go to its base URL."""
    upstream_headers: dict[str, str]
    gemini_upstream: Upstream
    gemini_target: GeminiTarget | None
    in_flight: InFlight
    dashboard: Dashboard
    """The dashboard's signing keys, answer cache and pipeline probe."""
    pool: asyncpg.Pool | None = None
    tenants: TenantStore | None = None
    publisher: EventPublisher | None = None
    admission: Admission | None = None
    """Balances and budgets enforced before a request goes upstream (needs the database)."""
    key_cache: KeyCache = field(default_factory=KeyCache)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _own_publisher: bool = False
    """Whether ``publisher`` was made here (and is stopped here) or handed in."""

    @property
    def broker_configured(self) -> bool:
        return bool(self.settings.kafka_bootstrap)

    def database(self) -> asyncpg.Pool:
        """The database pool, or 503 for a route that needs one when none is configured."""
        if self.pool is None:
            raise HTTPException(503, "no database is configured (set BILLING_DATABASE_URL)")
        return self.pool

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        settings: Settings,
        cache: PricingCache | None = None,
        upstream_transport: httpx.AsyncBaseTransport | None = None,
        publisher: EventPublisher | None = None,
    ) -> AsyncIterator[Resources]:
        """Open everything (``cache``, ``upstream_transport`` and ``publisher`` replace the
        real ones in tests), yield, and close it all whatever happens."""
        prices = cache or pricing_cache(settings)
        prices.poke()  # the first catalogue refresh starts in the background
        pool = (  # every gateway statement and connection wait is bounded
            await create_pool(settings.database_url, timeout=settings.database_timeout_seconds)
            if settings.database_url
            else None
        )

        # One pooled connection per request in flight, kept alive (past a keep-alive limit
        # every extra response would close its connection and the next open a new one). On
        # aiohttp's client: ~0.5-1 ms less CPU per proxied request than httpx's own
        # (httpcore); used directly, with the raw ASGI routes and uvloop, the request went
        # from ~2.2 to ~1.0 ms (bench/gateway.py --cpu-only; the three were measured
        # together). Tests play the upstream with an httpx transport.
        def upstream(base_url: str = "") -> Upstream:
            timeout = settings.upstream_timeout_seconds
            if upstream_transport is not None:
                return HttpxUpstream(
                    base_url=base_url, timeout=timeout, transport=upstream_transport
                )
            return AiohttpUpstream(
                base_url=base_url, max_connections=settings.max_in_flight, timeout=timeout
            )

        key = settings.openrouter_api_key
        topics = Topics.named(settings.topic_prefix)
        resources: Resources
        spool = await asyncio.to_thread(claim, settings.usage_spool_dir, settings.gateway_workers)
        emitter = Emitter(
            lambda: resources.publisher,
            topics.usage,
            spool,
            spool_max_bytes=settings.spool_max_bytes,
            reject_when_full=settings.spool_full_policy == "reject",
        )
        resources = cls(
            settings=settings,
            prices=prices,
            topics=topics,
            emitter=emitter,
            upstream=upstream(settings.openrouter_base_url),
            upstream_headers={"content-type": "application/json"}
            | ({"authorization": f"Bearer {key.get_secret_value()}"} if key else {}),
            gemini_upstream=upstream(),
            gemini_target=gemini_target(settings),
            in_flight=InFlight(settings.max_in_flight),
            dashboard=Dashboard.of(settings),
            pool=pool,
            tenants=PostgresTenantStore(pool) if pool is not None else None,
            publisher=publisher,
            admission=Admission(pool, settings, prices) if pool is not None else None,
        )
        try:
            await emitter.start()
            if resources.admission is not None:
                resources.admission.start()
            # Tokenizers for estimated usage load in the background (about half a second).
            resources._tasks.append(asyncio.create_task(asyncio.to_thread(_warm_tokenizers)))
            if publisher is None and settings.kafka_bootstrap:
                resources._tasks.append(
                    asyncio.create_task(resources._connect(settings.kafka_bootstrap))
                )
            yield resources
        finally:
            await resources._close()

    async def _connect(self, bootstrap: str) -> None:
        """Start the Kafka producer, retrying: the gateway serves quotes while the broker
        is away, and proxied usage goes to the spool meanwhile."""
        from aiokafka.errors import KafkaError

        backoff = Backoff(0.5, 10.0)
        while True:
            # The emitter and ingest hand over whole batches: the producer's own 5 ms linger
            # only delayed each acknowledgement (p50 6.7 -> 1.3-1.6 ms; bench/RESULTS.md).
            producer = make_producer(bootstrap, linger_ms=0)
            try:
                await producer.start()
            except KafkaError as exc:
                await producer.stop()
                delay = backoff.next()
                log.warning("broker %s unavailable (%r); retrying in %.1fs", bootstrap, exc, delay)
                await asyncio.sleep(delay)
                continue
            self.publisher = KafkaPublisher(producer)
            self._own_publisher = True
            log.info("connected to broker %s", bootstrap)
            return

    async def _close(self) -> None:
        await self.emitter.close()
        if self.admission is not None:
            await self.admission.close()
        for task in self._tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.upstream.close()
        await self.gemini_upstream.close()
        if self._own_publisher and isinstance(self.publisher, KafkaPublisher):
            await self.publisher.stop()
        if self.pool is not None:
            await self.pool.close()


class InFlight:
    """Counts proxied requests being served, up to a limit (admission control)."""

    __slots__ = ("limit", "count")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def enter(self) -> bool:
        if self.count >= self.limit:
            return False
        self.count += 1
        return True

    def leave(self) -> None:
        self.count -= 1


def resources_of(request: Request) -> Resources:
    """The gateway's resources (in a route's signature, use :data:`Deps`)."""
    resources: Resources = request.app.state.resources
    return resources


async def _resources(request: Request) -> Resources:
    # A coroutine on purpose: FastAPI runs a plain-function dependency in its thread pool,
    # a thread hand-off per request (+0.5-1 ms of CPU per proxied request, measured).
    return resources_of(request)


Deps = Annotated[Resources, Depends(_resources)]


def _warm_tokenizers() -> None:
    try:
        tokens.warm()
    except Exception:  # estimates will fail (and say so) per request; serving goes on
        log.exception("tokenizers for estimated usage could not be loaded")
