"""The price-book contract (tests/unit/test_pricebook.py) against the PostgreSQL adapter."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from services.adapters.pricebook_postgres import PostgresPriceBook
from services.core.pricing import parse_pricing
from tests.unit.test_pricebook import (  # noqa: F401 - collected here against this adapter
    test_a_backdated_correction_is_a_newer_version_nothing_is_overwritten,
    test_a_slug_shared_with_variants_aliases_the_base_model,
    test_aliases_and_spelling_variants_resolve,
    test_an_ambiguous_spelling_resolves_to_nothing,
    test_an_unchanged_price_is_not_a_new_version,
    test_catalogue_sync_records_only_changes,
    test_dated_ids_and_variants_never_resolve_loosely,
    test_lookup_takes_the_version_in_effect_at_a_time,
    test_naive_times_are_refused,
    test_overrides_win_over_the_catalogue,
    test_unknown_model_suggests_near_names,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def book(database_url: str) -> Iterator[PostgresPriceBook]:
    adapter = PostgresPriceBook(database_url)
    yield adapter
    adapter.close()


def test_two_books_on_one_database_share_versions(database_url: str) -> None:
    first, second = PostgresPriceBook(database_url), PostgresPriceBook(database_url)
    try:
        jan = datetime(2026, 1, 1, tzinfo=UTC)
        cheap = parse_pricing({"prompt": "0.000001", "completion": "0.000002"})
        dear = parse_pricing({"prompt": "0.000003", "completion": "0.000004"})
        a = first.record("acme/a", cheap, effective_from=jan)
        b = second.record("acme/b", dear, effective_from=jan)  # numbered after first's write
        assert a is not None and b is not None and b.version == a.version + 1
        first.add_alias("acme/b-old", "acme/b")
        second.reload()
        assert second.lookup("acme/a").pricing == cheap
        first.reload()
        assert first.lookup("acme/b-old").pricing == dear
        third = PostgresPriceBook(database_url)
        assert third.lookup("acme/b-old").version == b.version
        third.close()
    finally:
        first.close()
        second.close()


async def test_the_book_reconnects_after_the_database_dropped_it(database_url: str) -> None:
    import asyncpg

    book = PostgresPriceBook(database_url)
    try:
        admin = await asyncpg.connect(database_url)
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await admin.close()
        with contextlib.suppress(Exception):  # the first use notices the dropped connection
            book.reload()
        jan = datetime(2026, 1, 1, tzinfo=UTC)
        cheap = parse_pricing({"prompt": "0.000001", "completion": "0.000002"})
        assert book.record("acme/after-outage", cheap, effective_from=jan) is not None
        book.reload()
        assert book.lookup("acme/after-outage").pricing == cheap
    finally:
        book.close()


async def test_an_unusable_stored_version_is_skipped_not_fatal(database_url: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "INSERT INTO price_versions (version, model, layer, source, reason, effective_from,"
            " recorded_at, pricing) VALUES (1, 'x/broken', 'override', 'test', '', now(), now(),"
            """ '{"prompt": "0.1234567890123456789012345678901234", "completion": "1"}')"""
        )
    finally:
        await connection.close()
    book = PostgresPriceBook(database_url)  # would raise on the 35-place price
    try:
        assert "x/broken" not in book.models() and book.last_version == 1
        pricing = parse_pricing({"prompt": "0.1", "completion": "0.2"})
        version = book.record("x/fixed", pricing, effective_from=datetime(2026, 1, 1, tzinfo=UTC))
        assert version is not None and version.version == 2  # the skipped number stays taken
    finally:
        book.close()
