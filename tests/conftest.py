"""Shared test set-up: no test may reach the network or the developer's own data."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.adapters.database import migrate
from services.core.catalogue import apply_catalogue, default_catalogue
from services.core.pricebook import InMemoryPriceBook
from services.local.postgres import EmbeddedPostgres

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
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))  # never ~/.cache
    for name in ("VERTEX_BASE_URL", "VERTEX_API_KEY", "VERTEX_PROJECT", "VERTEX_REGION"):
        monkeypatch.delenv(name, raising=False)
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


# -- PostgreSQL: one server per session, a database per test ------------------------------------
# ``BILLING_TEST_DATABASE_URL`` names a server to use (its user must be allowed to create
# databases); otherwise the local server on 127.0.0.1:5432 when it answers, else an embedded
# one (``pgserver``) started for the session.

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


async def _answers(url: str) -> bool:
    try:
        connection = await asyncpg.connect(url, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await connection.close()
    return True


CONTAINERS = os.environ.get("BILLING_TEST_BACKEND") == "containers"
"""Run the integration suite against Apache Kafka and PostgreSQL containers (needs a Docker
engine and ``pip install -e '.[containers]'``); the default backend is embedded."""


def _containers() -> Any:
    try:
        import testcontainers  # noqa: F401
    except ImportError:
        pytest.fail("BILLING_TEST_BACKEND=containers needs: pip install -e '.[containers]'")
    return __import__("testcontainers")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a server on which tests may create databases."""
    configured = os.environ.get("BILLING_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    if CONTAINERS:
        _containers()
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver=None) as container:
            yield container.get_connection_url()
        return
    if asyncio.run(_answers(LOCAL_SERVER)):
        yield LOCAL_SERVER
        return
    embedded = EmbeddedPostgres(Path(tmp_path_factory.mktemp("pg")))
    url = embedded.start()
    yield url
    embedded.stop()


def _with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    root = base.rsplit("/", 1)[0]
    return f"{root}/{name}" + (f"?{query}" if query else "")


@contextlib.contextmanager
def migrated_database(postgres_server: str, label: str) -> Iterator[str]:
    """A fresh database with every migration applied, dropped afterwards (for fixtures that
    are not async, such as module-scoped stacks of processes)."""
    name = f"billing_{label}_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(postgres_server)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        url = _with_database(postgres_server, name)
        asyncio.run(migrate(url))
        yield url
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def empty_database_url(postgres_server: str) -> AsyncIterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"billing_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(postgres_server, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def database_url(empty_database_url: str) -> str:
    """A fresh database with every migration applied."""
    await migrate(empty_database_url)
    return empty_database_url


# -- Kafka: one broker per session (tests that stop or kill a broker start their own) -----------


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``BILLING_TEST_KAFKA_BOOTSTRAP`` when set, else an embedded Tansu broker."""
    configured = os.environ.get("BILLING_TEST_KAFKA_BOOTSTRAP")
    if configured:
        yield configured
        return
    if CONTAINERS:
        _containers()
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer("confluentinc/cp-kafka:7.6.1").with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    from services.local.broker import EmbeddedBroker

    with EmbeddedBroker(log_path=tmp_path_factory.mktemp("kafka") / "tansu.log") as broker:
        yield broker.bootstrap


@pytest.fixture
def topic_prefix() -> str:
    """A prefix that keeps one test's topics apart from every other's."""
    return f"t{uuid.uuid4().hex[:10]}."
