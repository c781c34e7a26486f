"""Integration tests share the PostgreSQL and broker fixtures of ``tests/conftest.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.adapters.kafka import ensure_topics
from tests.integration.pipeline import Pipeline


@pytest.fixture
async def pipeline(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, tmp_path: Path
) -> AsyncIterator[Pipeline]:
    """A pipeline on the session broker and a fresh database, topics made, nothing running:
    a test starts the services it needs (``pipeline.start("pricer")``); all stop after it."""
    running = Pipeline(kafka_bootstrap, database_url, topic_prefix, tmp_path)
    await ensure_topics(kafka_bootstrap, running.topics.partitions())
    try:
        yield running
    finally:
        running.stop_all()
