"""Build each service's dependencies from the settings (one place, shared by the CLI)."""

from __future__ import annotations

from datetime import UTC, datetime

from services.adapters.pricebook_file import FilePriceBook
from services.adapters.pricing_cache import OpenRouterCatalogue, PricingCache
from services.adapters.settings import Settings
from services.core.catalogue import apply_catalogue, default_catalogue
from services.core.pricebook import PriceBook


def open_price_book(settings: Settings) -> PriceBook:
    """PostgreSQL when a database is configured (shared by every service), else the file."""
    if not settings.database_url:
        return FilePriceBook.open(settings.price_book_path)
    from services.adapters.pricebook_postgres import PostgresPriceBook

    book = PostgresPriceBook(settings.database_url)
    if book.last_version == 0:  # a new database: start from the bundled offline prices
        apply_catalogue(book, default_catalogue(), observed_at=datetime.now(UTC), source="snapshot")
    return book


def openrouter_catalogue(settings: Settings) -> OpenRouterCatalogue:
    """The live catalogue client (base URL, optional key, timeout) from the settings."""
    key = settings.openrouter_api_key
    return OpenRouterCatalogue(
        settings.openrouter_base_url,
        key.get_secret_value() if key else None,
        timeout=settings.catalogue_timeout_seconds,
    )


def pricing_cache(settings: Settings, book: PriceBook | None = None) -> PricingCache:
    """The price book, refreshed from OpenRouter when ``catalogue_sync`` is on."""
    source = openrouter_catalogue(settings) if settings.catalogue_sync else None
    return PricingCache(
        book or open_price_book(settings),
        source,
        ttl=settings.catalogue_ttl_seconds,
        retry_after=settings.catalogue_retry_seconds,
    )
