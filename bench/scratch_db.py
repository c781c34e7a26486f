"""A scratch PostgreSQL database for one benchmark run, dropped afterwards whatever happens.

On ``BILLING_DATABASE_URL``'s server, else the local one (127.0.0.1:5432), else an embedded
pgserver in the run's work directory. Imported by the bench scripts that need a database
(they run as ``python bench/NAME.py``, so this folder is on ``sys.path``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from services.local.postgres import EmbeddedPostgres

DEFAULT_DB = "postgresql://postgres@127.0.0.1:5432/postgres"


@asynccontextmanager
async def scratch_database(workdir: Path, label: str) -> AsyncIterator[str]:
    """The URL of a new database ``bench_<label>_<hex>``; it is dropped on the way out."""
    base, embedded = os.environ.get("BILLING_DATABASE_URL") or DEFAULT_DB, None
    try:
        await (await asyncpg.connect(base, timeout=5)).close()
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"PostgreSQL at {base} unreachable ({exc!r}): starting the embedded one")
        embedded = EmbeddedPostgres(workdir)
        base = embedded.start()
    name = f"bench_{label}_{secrets.token_hex(4)}"
    try:
        await _admin(base, f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit(urlsplit(base)._replace(path=f"/{name}"))
        finally:
            await _admin(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            print(f"dropped {name}")
    finally:
        if embedded is not None:
            embedded.stop()


async def _admin(base: str, sql: str) -> None:
    admin = await asyncpg.connect(base)
    try:
        await admin.execute(sql)
    finally:
        await admin.close()
