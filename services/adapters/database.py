"""PostgreSQL: where it is (configured or embedded), and the numbered migrations.

``BILLING_DATABASE_URL`` wins; without it ``billing up`` starts an embedded server under
the data directory (``services.local.postgres``: the local stack, not an adapter).
Migrations are the plain SQL files in ``migrations/``, applied in order, each in its own
transaction, under an advisory lock so that several services starting at once apply each
file exactly once; ``schema_migrations`` records what was applied.

Every connection made here takes TLS from the settings (:func:`database_connect_options`:
``BILLING_DATABASE_SSLMODE``, ``BILLING_DATABASE_SSLROOTCERT``). Only a pool made with a
``timeout`` (the gateway's) bounds its statements, calls and connection waits: the
projector, the jobs and migrations run long statements on purpose.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from services.adapters.errors import DatabaseError
from services.adapters.settings import Settings

log = logging.getLogger("billing.database")

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
_MIGRATION_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_LOCK_ID = 0x62696C6C  # "bill": one advisory lock for every migrator


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files, in order; a malformed name or a gap in numbering is an error."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_FILE.match(path.name)
        if match is None:
            raise DatabaseError(f"{path.name}: migration files are named NNN_lowercase_name.sql")
        found.append(Migration(int(match.group(1)), path.stem, path.read_text()))
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise DatabaseError(f"migration {expected:03d} is missing before {migration.name}")
    return found


async def migrate(url: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations; return the names applied now."""
    connection = await connect(url)
    applied_now: list[str] = []
    try:
        await connection.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {
            row["version"]
            for row in await connection.fetch("SELECT version FROM schema_migrations")
        }
        for migration in migrations(directory):
            if migration.version in done:
                continue
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied_now.append(migration.name)
            log.info("applied migration %s", migration.name)
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
        await connection.close()
    return applied_now


def database_connect_options(settings: Settings | None = None) -> dict[str, Any]:
    """asyncpg's TLS option from ``settings`` (``None``: the environment's, as every service
    process reads them); empty when ``database_sslmode`` is unset, so the URL's own
    ``?sslmode=`` (or asyncpg's default, ``prefer``) applies."""
    settings = settings or Settings()
    mode = settings.database_sslmode
    if mode is None:
        return {}
    if mode in ("verify-ca", "verify-full"):
        root = settings.database_sslrootcert
        context = ssl.create_default_context(cafile=str(root) if root else None)
        context.check_hostname = mode == "verify-full"  # verify-ca: the chain only
        return {"ssl": context}
    return {"ssl": mode}


async def connect(url: str, **kwargs: Any) -> asyncpg.Connection:
    """A connection to ``url`` with the settings' TLS (``kwargs`` win)."""
    try:
        return await asyncpg.connect(url, **(database_connect_options() | kwargs))
    except (OSError, asyncpg.PostgresError) as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL: {exc}") from exc


@asynccontextmanager
async def connection_to(
    url: str, *, migrated: bool = False, codecs: bool = False
) -> AsyncIterator[asyncpg.Connection]:
    """One connection for a command or a job, closed whatever happens; ``migrated`` applies
    pending migrations first, ``codecs`` installs :func:`init_connection`'s codecs."""
    if migrated:
        await migrate(url)
    connection = await connect(url)
    try:
        if codecs:
            await init_connection(connection)
        yield connection
    finally:
        await connection.close()


async def lock_named(connection: asyncpg.Connection, name: str) -> None:
    """Take the transaction-scoped advisory lock called ``name`` (released at commit or
    rollback): one holder of a name at a time across every process on the database."""
    await connection.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", name)


async def init_connection(connection: asyncpg.Connection) -> None:
    """Per-connection codecs: jsonb as Python objects (used for ``metadata`` and prices)."""
    # Binary format (a version byte, then the text), so COPY can write jsonb columns too.
    await connection.set_type_codec(
        "jsonb",
        encoder=_jsonb_encode,
        decoder=_jsonb_decode,
        schema="pg_catalog",
        format="binary",
    )


def _jsonb_encode(value: Any) -> bytes:
    return b"\x01" + json.dumps(value, separators=(",", ":")).encode()


def _jsonb_decode(data: bytes) -> Any:
    return json.loads(data[1:])


async def create_pool(
    url: str, *, min_size: int = 1, max_size: int = 4, timeout: float | None = None
) -> asyncpg.Pool:
    """A pool with :func:`init_connection`'s codecs and the settings' TLS. ``timeout`` (the
    gateway's ``database_timeout_seconds``) bounds every statement on the server
    (``statement_timeout``), every call (``command_timeout``), every wait for a connection
    from the pool and every new connection; without it nothing is bounded (long jobs)."""
    options: dict[str, Any] = {
        "min_size": min_size,
        "max_size": max_size,
        "init": init_connection,
        **database_connect_options(),
    }
    try:
        if timeout is None:
            pool = await asyncpg.create_pool(url, **options)
        else:
            pool = await _BoundedPool.open(url, timeout, options)
    except (OSError, asyncpg.PostgresError) as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL: {exc}") from exc
    assert pool is not None  # noqa: S101 - create_pool returns None only when not awaited
    return pool


class _BoundedPool(asyncpg.Pool):  # type: ignore[misc]
    """A pool whose ``acquire()`` gives up after its timeout unless told otherwise (asyncpg
    has no pool-wide acquire timeout; ``pool.fetch()`` and the like go through here too)."""

    __slots__ = ("_acquire_timeout",)

    @classmethod
    async def open(cls, url: str, timeout: float, options: dict[str, Any]) -> asyncpg.Pool:
        server = dict(options.pop("server_settings", None) or {})
        server["statement_timeout"] = str(max(1, round(timeout * 1000)))  # milliseconds
        # The arguments asyncpg.create_pool passes (it takes no pool class of its own).
        pool = cls(
            url,
            connection_class=asyncpg.Connection,
            record_class=asyncpg.Record,
            max_queries=50000,
            max_inactive_connection_lifetime=300.0,
            loop=None,
            command_timeout=timeout,
            timeout=timeout,  # connecting
            server_settings=server,
            **options,
        )
        pool._acquire_timeout = timeout
        return await pool

    def acquire(self, *, timeout: float | None = None) -> Any:
        return super().acquire(timeout=self._acquire_timeout if timeout is None else timeout)
