"""Live prices: the OpenRouter catalogue client and the TTL cache in front of the price book.

A lookup never waits on the network. When the catalogue is older than the TTL, the next
lookup starts a background refresh and is answered from the book as it stands; a failed
refresh logs a warning, keeps the last good prices and is retried after a pause.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

import httpx

from services.adapters.errors import AdapterError, CatalogueUnavailable
from services.core.catalogue import SyncReport, apply_catalogue, parse_catalogue
from services.core.errors import PricingError
from services.core.pricebook import PriceBook, PriceVersion

log = logging.getLogger("billing.prices")


class CatalogueSource(Protocol):
    """Where live prices come from (the port; OpenRouter's ``/models`` in production)."""

    name: str

    async def fetch(self) -> object:
        """Return the catalogue document; raise ``CatalogueUnavailable`` on any failure."""
        ...


class OpenRouterCatalogue:
    """``GET {base_url}/models``; the API key is optional for this endpoint."""

    name = "openrouter"

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/models"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.transport = transport

    async def fetch(self) -> object:
        try:
            async with httpx.AsyncClient(timeout=self.timeout, transport=self.transport) as client:
                response = await client.get(self.url, headers=self.headers)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise CatalogueUnavailable(f"GET {self.url}: {exc!r}") from exc
        return _decode(response, self.url)

    def fetch_sync(self) -> object:
        try:
            response = httpx.get(self.url, headers=self.headers, timeout=self.timeout)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise CatalogueUnavailable(f"GET {self.url}: {exc!r}") from exc
        return _decode(response, self.url)


def _decode(response: httpx.Response, url: str) -> object:
    if response.status_code != 200:
        raise CatalogueUnavailable(f"GET {url}: HTTP {response.status_code}")
    try:
        return json.loads(response.content, parse_float=Decimal)
    except (ValueError, RecursionError) as exc:
        raise CatalogueUnavailable(f"GET {url}: body is not JSON ({exc})") from exc


def sync_catalogue(book: PriceBook, document: object, *, source: str) -> SyncReport:
    """Parse a catalogue document and record its changed prices in the book."""
    try:
        catalogue = parse_catalogue(document)
    except PricingError as exc:
        raise CatalogueUnavailable(f"catalogue unreadable: {exc}") from exc
    batch: Callable[[], AbstractContextManager[None]] = getattr(book, "batch", nullcontext)
    with batch():
        return apply_catalogue(book, catalogue, observed_at=datetime.now(UTC), source=source)


class PricingCache:
    """The price book plus a background refresh from a live catalogue every ``ttl`` seconds."""

    def __init__(
        self,
        book: PriceBook,
        source: CatalogueSource | None,
        *,
        ttl: float = 900.0,
        retry_after: float = 60.0,
        reload_every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.book = book
        self.source = source
        self.ttl = ttl
        self.retry_after = retry_after
        self.reload_every = reload_every
        self._clock = clock
        self._next_refresh = clock()  # due at once: the first lookup starts a refresh
        self._next_reload = clock() + reload_every
        self._task: asyncio.Task[SyncReport | None] | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self.last_success: datetime | None = None
        self.last_error: str | None = None
        self.last_report: SyncReport | None = None

    def lookup(self, model: str, at: datetime | None = None) -> PriceVersion:
        """Answer from the book now; start a refresh in the background if one is due."""
        self.poke()
        return self.book.lookup(model, at)

    def poke(self) -> None:
        """Start whatever background work is due: a catalogue refresh, a book reload."""
        now = self._clock()
        refresh_due = self.source is not None and now >= self._next_refresh
        if not refresh_due and now < self._next_reload:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (CLI): refresh only when asked to
        if refresh_due and (self._task is None or self._task.done()):
            self._task = loop.create_task(self.refresh())
        if now >= self._next_reload and (self._reload_task is None or self._reload_task.done()):
            # Overrides and corrections recorded by another process (the CLI) show up here
            # within ``reload_every`` seconds.
            self._next_reload = now + self.reload_every
            self._reload_task = loop.create_task(self._reload())

    async def _reload(self) -> None:
        try:
            await asyncio.to_thread(self.book.reload)
        except Exception as exc:  # a background task must log, not vanish
            self.last_error = f"price book reload failed: {exc!r}"
            log.exception("price book reload failed; serving prices held in memory")

    async def refresh(self) -> SyncReport | None:
        """Fetch and apply the catalogue once; on failure keep the last good prices."""
        if self.source is None:
            return None
        try:
            document = await self.source.fetch()
            # Parsing and the file writes run off the event loop so quotes keep flowing.
            report = await asyncio.to_thread(
                sync_catalogue, self.book, document, source=self.source.name
            )
        except Exception as exc:  # any failure: keep serving, say so, retry after a pause
            self.last_error = str(exc) if isinstance(exc, CatalogueUnavailable) else repr(exc)
            self._next_refresh = self._clock() + self.retry_after
            log.warning(
                "price refresh failed, serving the last good prices (retry in %.0fs): %s",
                self.retry_after,
                self.last_error,
                exc_info=not isinstance(exc, CatalogueUnavailable | AdapterError),
            )
            return None
        self.last_success = datetime.now(UTC)
        self.last_error = None
        self.last_report = report
        self._next_refresh = self._clock() + self.ttl
        log.info("price refresh: %s", report.to_json() | {"skipped": len(report.skipped)})
        return report

    def status(self) -> dict[str, Any]:
        return {
            "source": self.source.name if self.source else None,
            "ttl_seconds": self.ttl,
            "last_success": self.last_success.isoformat() if self.last_success else None,
            "last_error": self.last_error,
            "models": len(self.book.models()),
        }
