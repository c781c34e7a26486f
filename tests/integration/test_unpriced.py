"""Held usage: priceable rows are found however many unpriceable ones wait before them."""

from __future__ import annotations

import random

import pytest

from services.core.pricebook import InMemoryPriceBook
from services.pricer.unpriced import SCAN_LIMIT, UnpricedStore
from tests.integration.test_projector_apply import recorded

pytestmark = pytest.mark.integration


async def test_priceable_usage_is_not_starved_by_a_backlog(
    database_url: str, snapshot_book: InMemoryPriceBook
) -> None:
    rng = random.Random(2)
    unknown = [
        recorded(n, rng).model_copy(update={"provider_model_id": "typo/no-such-model"})
        for n in range(SCAN_LIMIT + 10)
    ]
    known = [recorded(n, rng).model_copy(update={"request_id": f"k-{n}"}) for n in range(3)]
    store = UnpricedStore(database_url)
    try:
        await store.hold([(r, "no price") for r in unknown])
        await store.hold([(r, "no price") for r in known])
        ready = await store.candidates(snapshot_book, snapshot_book)
        assert sorted(r.request_id for r in ready) == ["k-0", "k-1", "k-2"]
        await store.release([r.request_id for r in ready])
        assert await store.count() == SCAN_LIMIT + 10
        assert await store.candidates(snapshot_book, snapshot_book) == []
    finally:
        await store.close()
