"""What the dashboard keeps in each gateway process: its signing keys, a short-lived cache of
answers (many open pages of one tenant cost the database one read a second), and the probe
of the pipeline services' metrics for the operator view."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.adapters.settings import Settings
from services.gateway.dashboard.session import SessionKeys

LIVE_SECONDS = 1.0
"""How long a dashboard answer is reused (pages poll every 2 s)."""
SESSION_SECONDS = 1.0
"""How long a session lookup is reused: a page's poll asks several routes at once."""
MAX_ENTRIES = 4096


class AnswerCache:
    """Answers by key for ``ttl`` seconds; concurrent misses of one key share one read."""

    def __init__(self, ttl: float = LIVE_SECONDS, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[Hashable, tuple[float, asyncio.Future[Any]]] = {}

    async def get(self, key: Hashable, read: Callable[[], Awaitable[Any]]) -> Any:
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry[0] > now and not _failed(entry[1]):
            return await asyncio.shield(entry[1])
        if len(self._entries) >= self.max_entries:
            self._drop_expired(now)
        future: asyncio.Future[Any] = asyncio.ensure_future(read())
        self._entries[key] = (now + self.ttl, future)
        return await asyncio.shield(future)

    def forget(self, key: Hashable) -> None:
        """The next ``get`` of ``key`` reads again."""
        self._entries.pop(key, None)

    def _drop_expired(self, now: float) -> None:
        for key in [k for k, (until, _) in self._entries.items() if until <= now]:
            del self._entries[key]
        while len(self._entries) >= self.max_entries:  # all fresh: the oldest go
            del self._entries[next(iter(self._entries))]


def _failed(future: asyncio.Future[Any]) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


@dataclass(frozen=True, slots=True)
class ServiceHealth:
    name: str
    up: bool
    lag_seconds: float | None = None
    processed: float | None = None
    dead_lettered: float = 0.0
    memory_bytes: float | None = None
    error: str | None = None

    def json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "up": self.up,
            "lag_seconds": self.lag_seconds,
            "processed": self.processed,
            "dead_lettered": self.dead_lettered,
            "memory_bytes": self.memory_bytes,
            "error": self.error,
        }


PROCESSED = (
    "billing_priced_events_total",
    "billing_projected_events_total",
    "billing_quota_charges_total",
)


def health_of(name: str, text: str) -> ServiceHealth:
    """A service's health from its Prometheus text."""
    lag: float | None = None
    processed: float | None = None
    dead = 0.0
    memory: float | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "billing_pipeline_lag_seconds":
                lag = max(lag or 0.0, sample.value)
            elif sample.name in PROCESSED:
                processed = (processed or 0.0) + sample.value
            elif sample.name == "billing_dead_lettered_total":
                dead += sample.value
            elif sample.name == "process_resident_memory_bytes":
                memory = sample.value
    return ServiceHealth(name, True, lag, processed, dead, memory)


class PipelineProbe:
    """Reads each pipeline service's metrics (``BILLING_PIPELINE_METRICS``), at most once
    per ``ttl`` seconds whatever the number of operator pages, each read bounded by
    ``timeout``."""

    def __init__(self, endpoints: list[tuple[str, str]], timeout: float = 1.0) -> None:
        self.endpoints = endpoints
        self.timeout = timeout
        self.cache = AnswerCache(ttl=2.0, max_entries=4)

    async def services(self) -> list[ServiceHealth]:
        return list(await self.cache.get("services", self._read_all))

    async def _read_all(self) -> list[ServiceHealth]:
        if not self.endpoints:
            return []
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            return list(await asyncio.gather(*(self._read(client, *e) for e in self.endpoints)))

    @staticmethod
    async def _read(client: httpx.AsyncClient, name: str, url: str) -> ServiceHealth:
        try:
            response = await client.get(url)
            response.raise_for_status()
            return health_of(name, response.text)
        except (httpx.HTTPError, ValueError) as exc:
            return ServiceHealth(name, False, error=type(exc).__name__)


@dataclass(slots=True)
class Dashboard:
    keys: SessionKeys
    probe: PipelineProbe
    answers: AnswerCache = field(default_factory=AnswerCache)
    sessions: AnswerCache = field(default_factory=lambda: AnswerCache(ttl=SESSION_SECONDS))
    drift: AnswerCache = field(default_factory=lambda: AnswerCache(ttl=60.0, max_entries=4))
    """The drift panel reads an hour of transactions: once a minute at most."""

    @classmethod
    def of(cls, settings: Settings) -> Dashboard:
        secret = settings.session_secret
        key = secret.get_secret_value().encode() if secret else secrets.token_bytes(32)
        return cls(
            SessionKeys(key, settings.session_hours), PipelineProbe(settings.pipeline_endpoints)
        )
