"""Errors raised by the runtime adapters.

RuntimeFault                 root of this package's exceptions
├── ConfigError              settings that must not be used (e.g. a placeholder secret)
├── CatalogueUnavailable     the live model catalogue could not be fetched or read
└── PriceBookCorrupt         the price-book file holds a line that cannot be read
"""

from __future__ import annotations


class RuntimeFault(Exception):
    """Root of the runtime package's exceptions."""


class ConfigError(RuntimeFault):
    """Settings that are refused."""


class CatalogueUnavailable(RuntimeFault):
    """The OpenRouter catalogue could not be fetched or parsed."""


class PriceBookCorrupt(RuntimeFault):
    """A price-book file line that is neither valid nor a torn final write."""


class DatabaseError(RuntimeFault):
    """PostgreSQL cannot be reached, started or migrated."""
