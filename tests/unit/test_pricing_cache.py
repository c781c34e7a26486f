"""PricingCache: TTL refresh in the background, last good prices on failure, never blocking."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from services.adapters.errors import CatalogueUnavailable
from services.adapters.pricebook_file import FilePriceBook
from services.adapters.pricing_cache import OpenRouterCatalogue, PricingCache, sync_catalogue
from services.core.catalogue import apply_catalogue, default_catalogue
from services.core.pricebook import InMemoryPriceBook
from services.core.pricing import parse_pricing
from tests.conftest import OWN_FIXTURES, load_json

CATALOGUE_2026 = (OWN_FIXTURES / "catalogue_2026_shape.json").read_text()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSource:
    name = "fake"

    def __init__(self, document: object | None = None) -> None:
        self.document = document
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def fetch(self) -> object:
        self.calls += 1
        await self.gate.wait()
        if self.document is None:
            raise CatalogueUnavailable("upstream down")
        return self.document


def make_cache(source: FakeSource, clock: FakeClock) -> PricingCache:
    return PricingCache(InMemoryPriceBook(), source, ttl=900, retry_after=60, clock=clock)


async def settle(cache: PricingCache) -> None:
    task = cache._task
    if task is not None:
        await task


async def test_first_lookup_starts_a_refresh_and_ttl_spaces_them() -> None:
    clock, source = FakeClock(), FakeSource(load_json(OWN_FIXTURES / "catalogue_2026_shape.json"))
    cache = make_cache(source, clock)
    with pytest.raises(Exception, match="no price"):
        cache.lookup("acme/gamma-3")  # answered at once from the (empty) book
    await settle(cache)
    assert cache.lookup("acme/gamma-3").model == "acme/gamma-3"
    assert source.calls == 1
    clock.now += 899
    cache.lookup("acme/gamma-3")
    await settle(cache)
    assert source.calls == 1
    clock.now += 2
    cache.lookup("acme/gamma-3")
    await settle(cache)
    assert source.calls == 2
    assert cache.status()["last_error"] is None


async def test_a_failed_refresh_keeps_the_last_good_prices_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, source = FakeClock(), FakeSource(load_json(OWN_FIXTURES / "catalogue_2026_shape.json"))
    cache = make_cache(source, clock)
    await cache.refresh()
    source.document = None
    clock.now += 901
    with caplog.at_level(logging.WARNING, logger="billing.prices"):
        assert cache.lookup("acme/alpha-1").pricing.prompt is not None
        await settle(cache)
    assert "serving the last good prices" in caplog.text
    assert cache.status()["last_error"] == "upstream down"
    assert cache.lookup("acme/alpha-1").model == "acme/alpha-1"
    # Retried after the pause, not on every lookup.
    calls = source.calls
    cache.lookup("acme/alpha-1")
    await settle(cache)
    assert source.calls == calls
    clock.now += 61
    cache.lookup("acme/alpha-1")
    await settle(cache)
    assert source.calls == calls + 1


async def test_lookups_are_not_blocked_by_a_slow_refresh() -> None:
    clock, source = FakeClock(), FakeSource(load_json(OWN_FIXTURES / "catalogue_2026_shape.json"))
    cache = make_cache(source, clock)
    apply_catalogue(
        cache.book, default_catalogue(), observed_at=datetime.now(UTC), source="snapshot"
    )  # type: ignore[arg-type]
    source.gate.clear()  # the catalogue hangs
    for _ in range(100):
        assert cache.lookup("openai/gpt-5").model == "openai/gpt-5"
    await asyncio.sleep(0)
    assert source.calls == 1  # one refresh in flight, not one per lookup
    source.gate.set()
    await settle(cache)
    assert cache.lookup("acme/alpha-1").model == "acme/alpha-1"


def test_no_event_loop_means_no_background_refresh() -> None:
    clock, source = FakeClock(), FakeSource({"data": []})
    cache = make_cache(source, clock)
    cache.poke()
    assert source.calls == 0


async def test_openrouter_client_against_a_mock_transport() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=CATALOGUE_2026)

    client = OpenRouterCatalogue(
        "http://or.test/api/v1/", "sk-or-x", transport=httpx.MockTransport(handler)
    )
    document = await client.fetch()
    assert seen[0].url == "http://or.test/api/v1/models"
    assert seen[0].headers["authorization"] == "Bearer sk-or-x"
    assert isinstance(document, dict) and len(document["data"]) == 3


@pytest.mark.parametrize(
    "response",
    [httpx.Response(503, content=b"busy"), httpx.Response(200, content=b"<html>")],
)
async def test_openrouter_client_failures_are_typed(response: httpx.Response) -> None:
    client = OpenRouterCatalogue(
        "http://or.test/api/v1", transport=httpx.MockTransport(lambda _: response)
    )
    with pytest.raises(CatalogueUnavailable):
        await client.fetch()


async def test_unreachable_catalogue_is_typed() -> None:
    client = OpenRouterCatalogue("http://127.0.0.1:9/api/v1", timeout=2)
    with pytest.raises(CatalogueUnavailable):
        await client.fetch()


def test_sync_into_a_file_book_is_one_batch(tmp_path: Path) -> None:
    book = FilePriceBook(tmp_path / "p.jsonl")
    report = sync_catalogue(book, load_json(OWN_FIXTURES / "catalogue_2026_shape.json"), source="t")
    assert report.new_versions == 3
    assert (
        FilePriceBook(tmp_path / "p.jsonl").lookup("acme/3-gamma-20260301").model == "acme/gamma-3"
    )
    with pytest.raises(CatalogueUnavailable):
        sync_catalogue(book, {"data": "nope"}, source="t")


async def test_prices_recorded_by_another_process_are_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "prices.jsonl"
    clock = FakeClock()
    cache = PricingCache(FilePriceBook.open(path), None, reload_every=5, clock=clock)
    before = cache.lookup("openai/gpt-5").pricing.prompt
    other = FilePriceBook(path)  # e.g. `billing prices override` in another process
    deal = parse_pricing({"prompt": "0.000001", "completion": "0.000008"})
    other.record("openai/gpt-5", deal, effective_from=datetime(2026, 1, 1, tzinfo=UTC),
                 layer="override", reason="negotiated")  # fmt: skip
    assert cache.lookup("openai/gpt-5").pricing.prompt == before  # not yet due
    clock.now += 6
    cache.lookup("openai/gpt-5")
    assert cache._reload_task is not None
    await cache._reload_task
    assert cache.lookup("openai/gpt-5").pricing == deal


class BrokenSource(FakeSource):
    async def fetch(self) -> object:
        self.calls += 1
        raise httpx.InvalidURL("bad base url")


async def test_an_unexpected_refresh_error_is_reported_and_paced() -> None:
    clock, source = FakeClock(), BrokenSource()
    cache = make_cache(source, clock)
    for _ in range(5):
        with pytest.raises(Exception, match="no price"):
            cache.lookup("acme/gamma-3")
        await settle(cache)
    assert source.calls == 1
    assert "InvalidURL" in (cache.status()["last_error"] or "")
