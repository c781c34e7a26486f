"""The object every command receives: the data dir, settings and the price book."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from services.adapters.errors import ConfigError, DatabaseError, PriceBookCorrupt
from services.adapters.paths import price_book_path
from services.adapters.pricebook_file import FilePriceBook
from services.core.pricebook import PriceBook

if TYPE_CHECKING:
    from services.adapters.settings import Settings

# Settings (pydantic), the HTTP client and the web stack are imported by the commands that
# need them: ``billing quote --batch`` starts in a fraction of the time without them.


class Context:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._book: PriceBook | None = None
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from services.adapters.settings import Settings

            try:
                self._settings = Settings(data_dir=self.data_dir)
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from exc
        return self._settings

    @property
    def book(self) -> PriceBook:
        """The shared PostgreSQL price book when a database is configured, else the file."""
        if self._book is None:
            try:
                if os.environ.get("BILLING_DATABASE_URL"):
                    from services.adapters.wiring import open_price_book

                    self._book = open_price_book(self.settings)
                else:
                    self._book = FilePriceBook.open(price_book_path(self.data_dir))
            except (PriceBookCorrupt, DatabaseError) as exc:
                raise click.ClickException(str(exc)) from exc
        return self._book
