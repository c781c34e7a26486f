"""Errors raised by the adapters.

AdapterError                 root of this package's exceptions
├── ConfigError              settings that must not be used (e.g. a placeholder secret)
├── CatalogueUnavailable     the live model catalogue could not be fetched or read
├── PriceBookCorrupt         the price-book file holds a line that cannot be read
├── DatabaseError            PostgreSQL cannot be reached, started or migrated
├── PublishError             the broker did not acknowledge every event of a publish
├── TopicSetupFailed         (kafka.py) topics could not be created as asked
└── TenantError              (tenants.py) a tenant or key operation that cannot be done

The local stack's ``BrokerError`` (``services.local.broker``) derives from it too.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Root of the adapters' exceptions."""


class ConfigError(AdapterError):
    """Settings that are refused."""


class CatalogueUnavailable(AdapterError):
    """The OpenRouter catalogue could not be fetched or parsed."""


class PriceBookCorrupt(AdapterError):
    """A price-book file line that is neither valid nor a torn final write."""


class DatabaseError(AdapterError):
    """PostgreSQL cannot be reached, started or migrated."""


class PublishError(AdapterError):
    """Not every event of a publish was acknowledged in time (some may have been)."""
