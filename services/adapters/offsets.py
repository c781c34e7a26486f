"""Consumer offsets stored in PostgreSQL (``consumer_offsets``), beside the read models.

A consumer that writes its read models and the offsets it consumed in one transaction
applies each message exactly once, whatever Kafka redelivers: on (re)assignment it resumes
from :func:`stored_offsets`, and a batch fences itself with :func:`lock_offsets` before
writing and ends with :func:`store_offsets`. Offsets here are the *next* offset to read.
Run these in the caller's transaction; ``consumer`` names whose offsets they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg

Offsets = Mapping[tuple[str, int], int]
"""(topic, partition) → next offset."""


async def lock_offsets(
    connection: asyncpg.Connection, consumer: str, offsets: Offsets
) -> dict[tuple[str, int], int]:
    """Lock (creating at 0) the stored offsets of ``offsets``' partitions; return them.

    Rows are locked in (topic, partition) order, so two lockers never deadlock on them.
    """
    keys = sorted(offsets)
    topics = [t for t, _ in keys]
    partitions = [p for _, p in keys]
    await connection.execute(
        "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset)"
        " SELECT $1, t, p, 0 FROM unnest($2::text[], $3::int[]) AS x(t, p)"
        " ON CONFLICT DO NOTHING",
        consumer,
        topics,
        partitions,
    )
    rows = await connection.fetch(
        "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer = $1"
        " AND (topic, partition) IN (SELECT * FROM unnest($2::text[], $3::int[]))"
        " ORDER BY topic, partition FOR UPDATE",
        consumer,
        topics,
        partitions,
    )
    return {(r["topic"], r["partition"]): r["next_offset"] for r in rows}


async def stored_offsets(
    connection: asyncpg.Connection, consumer: str, topic: str
) -> dict[int, int]:
    """partition → next offset to read, as last committed with the read models."""
    rows = await connection.fetch(
        "SELECT partition, next_offset FROM consumer_offsets WHERE consumer = $1 AND topic = $2",
        consumer,
        topic,
    )
    return {r["partition"]: r["next_offset"] for r in rows}


async def store_offsets(connection: asyncpg.Connection, consumer: str, offsets: Offsets) -> None:
    """Store ``offsets``; a stored offset only moves forward (a late batch never rewinds)."""
    await connection.executemany(
        "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (consumer, topic, partition)"
        " DO UPDATE SET next_offset = GREATEST(consumer_offsets.next_offset,"
        " EXCLUDED.next_offset), updated_at = now()",
        [(consumer, t, p, o) for (t, p), o in offsets.items()],
    )
