"""Usage held back for want of a price, in PostgreSQL, until its model gets one."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from services.adapters.database import create_pool
from services.core.errors import PriceNotFound
from services.core.events import UsageRecorded
from services.core.pricebook import PriceBook, PriceLookup

SCAN_LIMIT = 5000
_HELD_MODELS = "SELECT DISTINCT provider_model_id FROM unpriced_usage"


class UnpricedStore:
    """Backed by ``unpriced_usage``; the pool is opened on first use, in the caller's loop."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._pool: asyncpg.Pool | None = None

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            self._pool = await create_pool(self.database_url, max_size=2)
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def hold(self, items: Sequence[tuple[UsageRecorded, str]]) -> None:
        await (await self.pool()).executemany(
            "INSERT INTO unpriced_usage (request_id, tenant_id, provider_model_id, event, reason)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (request_id) DO UPDATE"
            " SET attempts = unpriced_usage.attempts + 1, reason = EXCLUDED.reason",
            [
                (r.request_id, r.tenant_id, r.provider_model_id, r.model_dump(mode="json"), why)
                for r, why in items
            ],
        )

    async def candidates(self, prices: PriceLookup, book: PriceBook) -> list[UsageRecorded]:
        """Held usage that the price book can price now.

        Only models the book knows are read back (one query per tick, whatever is held for
        models that still have no price), so priceable usage is never starved behind a
        backlog of unknown models; a row whose model has a price, but not yet at its
        ``occurred_at``, stays held.
        """
        pool = await self.pool()
        models = [r["provider_model_id"] for r in await pool.fetch(_HELD_MODELS)]
        known = [m for m in models if book.resolve(m) is not None]
        if not known:
            return []
        rows = await pool.fetch(
            "SELECT event FROM unpriced_usage WHERE provider_model_id = ANY($1::text[])"
            " ORDER BY first_seen LIMIT $2",
            known,
            SCAN_LIMIT,
        )
        ready = []
        for row in rows:
            recorded = UsageRecorded.model_validate(row["event"])
            try:
                prices.lookup(recorded.provider_model_id, recorded.occurred_at)
            except PriceNotFound:
                continue
            ready.append(recorded)
        return ready

    async def release(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            await (await self.pool()).execute(
                "DELETE FROM unpriced_usage WHERE request_id = ANY($1::text[])", list(request_ids)
            )

    async def count(self) -> int:
        return int(await (await self.pool()).fetchval("SELECT count(*) FROM unpriced_usage"))
