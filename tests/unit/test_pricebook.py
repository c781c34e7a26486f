"""The price-book contract, run against every adapter (in-memory and file)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from services.adapters.errors import PriceBookCorrupt
from services.adapters.pricebook_file import FilePriceBook
from services.core.catalogue import apply_catalogue, parse_catalogue
from services.core.errors import PriceNotFound
from services.core.pricebook import InMemoryPriceBook, PriceBook, spelling_key
from services.core.pricing import parse_pricing
from tests.conftest import OWN_FIXTURES, load_json, shared_fixture

JAN = datetime(2026, 1, 1, tzinfo=UTC)
FEB = datetime(2026, 2, 1, tzinfo=UTC)
MAR = datetime(2026, 3, 1, tzinfo=UTC)
CHEAP = parse_pricing({"prompt": "0.000001", "completion": "0.000002"})
DEAR = parse_pricing({"prompt": "0.000003", "completion": "0.000006"})
DEAL = parse_pricing({"prompt": "0.0000005", "completion": "0.000001"})


@pytest.fixture(params=["memory", "file"])
def book(request: pytest.FixtureRequest, tmp_path: Path) -> PriceBook:
    if request.param == "memory":
        return InMemoryPriceBook()
    return FilePriceBook(tmp_path / "prices.jsonl")


def test_lookup_takes_the_version_in_effect_at_a_time(book: PriceBook) -> None:
    v1 = book.record("acme/a", CHEAP, effective_from=JAN)
    v2 = book.record("acme/a", DEAR, effective_from=MAR)
    assert v1 is not None and v2 is not None and v2.version > v1.version
    assert book.lookup("acme/a", FEB).pricing == CHEAP
    assert book.lookup("acme/a", MAR).pricing == DEAR
    assert book.lookup("acme/a", MAR + timedelta(days=400)).pricing == DEAR
    with pytest.raises(PriceNotFound) as caught:
        book.lookup("acme/a", JAN - timedelta(seconds=1))
    assert "in effect at" in caught.value.reason


def test_an_unchanged_price_is_not_a_new_version(book: PriceBook) -> None:
    assert book.record("acme/a", CHEAP, effective_from=JAN) is not None
    assert book.record("acme/a", CHEAP, effective_from=FEB) is None
    assert len(book.history("acme/a")) == 1


def test_a_backdated_correction_is_a_newer_version_nothing_is_overwritten(book: PriceBook) -> None:
    book.record("acme/a", CHEAP, effective_from=JAN)
    book.record("acme/a", DEAR, effective_from=MAR)
    fix = book.record("acme/a", DEAL, effective_from=FEB, source="correction", reason="typo")
    assert fix is not None
    assert book.lookup("acme/a", FEB + timedelta(days=1)).pricing == DEAL
    assert book.lookup("acme/a", MAR).pricing == DEAR
    assert [v.pricing for v in book.history("acme/a")] == [CHEAP, DEAR, DEAL]


def test_overrides_win_over_the_catalogue(book: PriceBook) -> None:
    book.record("acme/a", CHEAP, effective_from=JAN)
    book.record("acme/a", DEAL, effective_from=FEB, layer="override", source="override")
    assert book.lookup("acme/a", JAN + timedelta(days=1)).pricing == CHEAP
    assert book.lookup("acme/a", MAR).pricing == DEAL
    book.record("acme/a", DEAR, effective_from=MAR)  # a later catalogue change
    assert book.lookup("acme/a", MAR).layer == "override"


def test_aliases_and_spelling_variants_resolve(book: PriceBook) -> None:
    book.record("anthropic/claude-sonnet-4.5", CHEAP, effective_from=JAN)
    book.add_alias("anthropic/claude-4.5-sonnet-20250929", "anthropic/claude-sonnet-4.5")
    for name in (
        "anthropic/claude-sonnet-4.5",
        "anthropic/claude-sonnet-4-5",
        "Anthropic/Claude-Sonnet-4.5",
        "anthropic/claude-4.5-sonnet-20250929",
        "anthropic/claude-4-5-sonnet-20250929",
    ):
        assert book.lookup(name, FEB).model == "anthropic/claude-sonnet-4.5", name


def test_dated_ids_and_variants_never_resolve_loosely(book: PriceBook) -> None:
    # A dated snapshot or a :batch/:free variant may carry another price: only an explicit
    # alias may map it.
    book.record("openai/gpt-4o", CHEAP, effective_from=JAN)
    for name in ("openai/gpt-4o-2024-05-13", "openai/gpt-4o:free", "openai/gpt-4o:batch"):
        with pytest.raises(PriceNotFound) as caught:
            book.lookup(name, FEB)
        assert "openai/gpt-4o" in caught.value.suggestions


def test_an_ambiguous_spelling_resolves_to_nothing(book: PriceBook) -> None:
    book.record("acme/m-1.5", CHEAP, effective_from=JAN)
    book.record("acme/M-1-5", DEAR, effective_from=JAN)
    assert book.lookup("acme/m-1.5", FEB).pricing == CHEAP  # exact ids still work
    assert book.resolve("ACME/m-1-5") is None


def test_a_slug_shared_with_variants_aliases_the_base_model(book: PriceBook) -> None:
    slug = "acme/x-20260101"
    rows = [
        {"id": m, "canonical_slug": slug, "pricing": {"prompt": p, "completion": p}}
        for m, p in (("acme/x", "2"), ("acme/x:batch", "1"), ("acme/x:free", "0"))
    ]
    apply_catalogue(book, parse_catalogue({"data": rows}), observed_at=JAN, source="t")
    assert book.lookup("acme/x-20260101", FEB).model == "acme/x"
    assert book.lookup("ACME/X", FEB).model == "acme/x"


def test_unknown_model_suggests_near_names(book: PriceBook) -> None:
    book.record("anthropic/claude-sonnet-4.5", CHEAP, effective_from=JAN)
    book.record("openai/gpt-5", CHEAP, effective_from=JAN)
    with pytest.raises(PriceNotFound) as caught:
        book.lookup("anthropic/claude-sonet-4.5", FEB)
    assert caught.value.suggestions[0] == "anthropic/claude-sonnet-4.5"
    with pytest.raises(PriceNotFound):
        book.lookup("nobody/nothing", FEB)


def test_naive_times_are_refused(book: PriceBook) -> None:
    with pytest.raises(ValueError, match="timezone"):
        book.record("acme/a", CHEAP, effective_from=datetime(2026, 1, 1))  # noqa: DTZ001


def test_catalogue_sync_records_only_changes(book: PriceBook) -> None:
    first = apply_catalogue(
        book,
        parse_catalogue(load_json(OWN_FIXTURES / "catalogue_2025_shape.json")),
        observed_at=JAN,
        source="file",
    )
    assert (first.new_versions, first.unchanged, len(first.skipped)) == (2, 0, 2)
    second = apply_catalogue(
        book,
        parse_catalogue(load_json(OWN_FIXTURES / "catalogue_2026_shape.json")),
        observed_at=MAR,
        source="file",
    )
    # alpha-1 changed price, gamma-3 is new, beta-2:free is unchanged.
    assert (second.new_versions, second.unchanged) == (2, 1)
    assert book.lookup("acme/alpha-1", FEB).pricing.prompt == Decimal("0.000002")
    assert book.lookup("acme/alpha-1", MAR).pricing.prompt == Decimal("0.0000018")
    assert book.lookup("acme/3-gamma-20260301", MAR).model == "acme/gamma-3"


def test_spelling_key() -> None:
    assert spelling_key(" Anthropic/claude-sonnet-4-5") == "anthropic/claude-sonnet-4.5"
    assert spelling_key("openai/gpt-4o:batch") == "openai/gpt-4o:batch"


def test_every_real_slug_resolves_to_a_base_model() -> None:
    doc = load_json(shared_fixture("openrouter/models-2026-08-19.json"))
    book = InMemoryPriceBook()
    apply_catalogue(book, parse_catalogue(doc), observed_at=JAN, source="t")
    slugs = {row["canonical_slug"] for row in doc["data"]}
    resolved = {slug: book.resolve(slug) for slug in slugs}
    assert all(":" not in model for model in resolved.values() if model), resolved
    assert resolved["anthropic/claude-4.5-sonnet-20250929"] == "anthropic/claude-sonnet-4.5"
    assert resolved["openai/gpt-5-2025-08-07"] == "openai/gpt-5"
    assert book.resolve("OpenAI/GPT-4o") == "openai/gpt-4o"


# -- file adapter specifics ---------------------------------------------------------------------


def test_file_book_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "prices.jsonl"
    book = FilePriceBook(path)
    book.record("acme/a", CHEAP, effective_from=JAN)
    book.add_alias("acme/a-old", "acme/a")
    book.record("acme/a", DEAL, effective_from=FEB, layer="override", reason="negotiated")
    again = FilePriceBook(path)
    assert again.lookup("acme/a-old", MAR).pricing == DEAL
    assert again.lookup("acme/a", MAR).reason == "negotiated"
    assert again.last_version == book.last_version


def test_file_book_ignores_a_torn_final_line_and_cuts_it_off(tmp_path: Path) -> None:
    path = tmp_path / "prices.jsonl"
    FilePriceBook(path).record("acme/a", CHEAP, effective_from=JAN)
    with path.open("a") as handle:
        handle.write('{"type":"version","model":"acme/a","vers')  # crash mid-write
    book = FilePriceBook(path)
    assert book.lookup("acme/a", FEB).pricing == CHEAP
    book.record("acme/a", DEAR, effective_from=MAR)
    assert FilePriceBook(path).lookup("acme/a", MAR).pricing == DEAR


def test_file_book_reports_a_corrupt_line(tmp_path: Path) -> None:
    path = tmp_path / "prices.jsonl"
    path.write_text("this is not json\n")
    with pytest.raises(PriceBookCorrupt, match="byte 0"):
        FilePriceBook(path)


def _record_many(path: str, model: str, count: int) -> None:
    book = FilePriceBook(Path(path))
    for i in range(count):
        pricing = parse_pricing({"prompt": f"0.00000{i + 1}", "completion": "0.000001"})
        book.record(model, pricing, effective_from=JAN + timedelta(days=i))


def test_two_processes_writing_one_file_never_share_a_version(tmp_path: Path) -> None:
    path = tmp_path / "prices.jsonl"
    FilePriceBook(path)
    spawn: Callable[..., multiprocessing.Process] = multiprocessing.get_context("fork").Process
    workers = [spawn(target=_record_many, args=(str(path), f"acme/m{n}", 20)) for n in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    book = FilePriceBook(path)
    versions = [v.version for m in book.models() for v in book.history(m)]
    assert len(versions) == 40
    assert sorted(versions) == list(range(1, 41))
