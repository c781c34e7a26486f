"""The price book in PostgreSQL (the adapter every service shares in production).

Tables ``price_versions`` and ``price_aliases`` (migration 001) hold the facts; lookups are
served from memory (the in-memory adapter this class extends) and ``reload()`` pulls in
versions other processes added. The port is synchronous — lookups sit on the hot path and
writes are rare (a catalogue sync, a correction) — so the asyncpg connection lives on a
private event-loop thread and the synchronous methods wait on it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import asyncpg

from services.adapters.database import connect, init_connection
from services.core.errors import BillingError
from services.core.pricebook import InMemoryPriceBook, PriceVersion
from services.core.pricing import parse_pricing

log = logging.getLogger("billing.pricebook")
T = TypeVar("T")
_WRITE_LOCK = 0x70726963  # "pric": serialises version numbering across processes


class PostgresPriceBook(InMemoryPriceBook):
    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        super().__init__()
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._lock = threading.Lock()  # one statement at a time on the one connection
        self._url = url
        self._connection: asyncpg.Connection = self._run(self._open(url))
        self.reload()

    @staticmethod
    async def _open(url: str) -> asyncpg.Connection:
        connection = await connect(url)
        await init_connection(connection)
        return connection

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(self._timeout)

    async def _connected(self) -> asyncpg.Connection:
        """The connection, reopened if the database dropped it (a restart, an outage)."""
        if self._connection.is_closed():
            self._connection = await self._open(self._url)
        return self._connection

    def close(self) -> None:
        self._run(self._connection.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    # -- reading ------------------------------------------------------------------------------

    def reload(self) -> None:
        async def catch_up() -> None:
            await self._catch_up(await self._connected())

        with self._lock:
            self._run(catch_up())

    async def _catch_up(self, connection: asyncpg.Connection) -> None:
        rows = await connection.fetch(
            "SELECT version, model, layer, source, reason, effective_from, recorded_at, pricing"
            " FROM price_versions WHERE version > $1 ORDER BY version",
            self.last_version,
        )
        for row in rows:
            try:
                pricing = parse_pricing(row["pricing"], row["model"])
            except BillingError as exc:  # one bad row must not stop every later version
                log.error(
                    "price version %s of %s is unusable, skipped: %s",
                    row["version"],
                    row["model"],
                    exc,
                )
                self._last_version = max(self._last_version, row["version"])  # numbers taken
                continue
            self._apply(
                PriceVersion(
                    model=row["model"],
                    version=row["version"],
                    pricing=pricing,
                    effective_from=row["effective_from"],
                    recorded_at=row["recorded_at"],
                    layer=row["layer"],
                    source=row["source"],
                    reason=row["reason"],
                )
            )
        known = self.aliases()
        for row in await connection.fetch("SELECT alias, model FROM price_aliases"):
            if known.get(row["alias"]) != row["model"]:
                super().add_alias(row["alias"], row["model"])

    # -- writing ------------------------------------------------------------------------------

    def _write(self, prepare: Callable[[], PriceVersion | None]) -> PriceVersion | None:
        async def write() -> PriceVersion | None:
            connection = await self._connected()
            async with connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock($1)", _WRITE_LOCK)
                await self._catch_up(connection)
                version = prepare()
                if version is None:
                    return None
                await connection.execute(
                    "INSERT INTO price_versions (version, model, layer, source, reason,"
                    " effective_from, recorded_at, pricing) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
                    version.version,
                    version.model,
                    version.layer,
                    version.source,
                    version.reason,
                    version.effective_from,
                    version.recorded_at,
                    dict(version.pricing_json),
                )
            self._apply(version)  # only once committed
            return version

        with self._lock:
            return self._run(write())

    def add_alias(self, alias: str, model: str) -> None:
        if alias == model or self.aliases().get(alias) == model:
            return

        async def write() -> None:
            await (await self._connected()).execute(
                "INSERT INTO price_aliases (alias, model) VALUES ($1, $2)"
                " ON CONFLICT (alias) DO UPDATE SET model = EXCLUDED.model",
                alias,
                model,
            )

        with self._lock:
            self._run(write())
        super().add_alias(alias, model)
