"""Shared test set-up: no test may reach the network or the developer's own data."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from services.core.catalogue import apply_catalogue, default_catalogue
from services.core.pricebook import InMemoryPriceBook

SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
OWN_FIXTURES = Path(__file__).resolve().parent / "fixtures"


def shared_fixture(relative: str) -> Path:
    """A file of ../shared/fixtures, or skip the test saying why."""
    path = SHARED_FIXTURES / relative
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (it lives in ../shared, outside the repo)")
    return path


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(), parse_float=Decimal)


@pytest.fixture(autouse=True)
def offline_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Point every setting at a scratch directory and an address where nothing listens."""
    monkeypatch.setenv("BILLING_DATA_DIR", str(tmp_path / "billing-data"))
    monkeypatch.setenv("BILLING_CATALOGUE_SYNC", "false")
    monkeypatch.setenv("OPENROUTER_BASE_URL", "http://127.0.0.1:9/api/v1")
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    monkeypatch.delenv("BILLING_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("BILLING_ENV", raising=False)
    yield


@pytest.fixture
def snapshot_book() -> InMemoryPriceBook:
    """An in-memory book holding the bundled offline price list."""
    book = InMemoryPriceBook()
    apply_catalogue(book, default_catalogue(), observed_at=datetime.now(UTC), source="snapshot")
    return book


_REPORT: list[str] = []


@pytest.fixture
def report() -> Callable[[str], None]:
    """Add a line to the summary printed at the end of the run (figures a test measured)."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _REPORT:
        terminalreporter.section("measured")
        for line in _REPORT:
            terminalreporter.write_line(line)
