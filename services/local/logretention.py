"""Retention for the embedded broker's durable log: Tansu 0.6.0 keeps it in S3 and trims nothing.

Tansu writes each produced batch as one object, ``clusters/<cluster>/topics/<topic>/
partitions/<partition, 10 digits>/records/<base offset, 20 digits>.batch``, and on every fetch
below the high watermark (and every ListOffsets) it lists *every* object of the partition,
stopping when the fetch's ``max_wait`` is over. Measured here (`weed mini`, one partition):
about 12 µs per object — 14 ms at 1,000 objects, 120 ms at 10,000, 474 ms at 40,000. Past
the point where the listing outlasts the consumers' ``fetch_max_wait_ms`` a fetch returns
nothing at all and consumers stop (``BILLING_KAFKA_FETCH_MAX_WAIT_MS``); before it, the
listings cost `weed` CPU in proportion to the log's length. ``retention.ms`` is accepted
and ignored, and DeleteRecords fails.

So the stack trims the log itself: :func:`trimmable` picks, per partition, the oldest batches
that are older than the retention *and* that every service of the stack has consumed (their
committed positions: the projector's and the quota service's in ``consumer_offsets``, the
pricer's group offsets in the broker); :class:`LogRetention` lists the objects through the S3
API and deletes them. Only a prefix of a partition goes (never a hole), and never its last
batch; then, every 2 minutes at most, weed's master is asked to compact the volumes whose
deleted share passed 30 % (it checks, and compacts only those): that is when the deleted
batches' disk comes back. Measured against Tansu
(``tests/integration/test_log_retention.py``): a consumer from the earliest offset starts at
the first batch left, a fetch at a trimmed offset answers from the next one, and produce,
group offsets and restarts are unaffected.

With retention off (the default) nothing is deleted; the sweep only counts the batches, every
10 minutes, and warns once when a partition holds more than ``CROWDED_BATCHES`` of them. A
trimmed log no longer starts at offset 0, so ``billing rebuild`` refuses it, as on a Kafka
cluster whose retention trimmed the log; the read models in PostgreSQL are unaffected.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger(__name__)

CLUSTER = "tansu_cluster"
"""Tansu's cluster id when none is given (``--cluster-id``): the objects' first folder."""
CROWDED_BATCHES = 5_000
"""Past this many batches in one partition, a listing takes ~60 ms: warn (retention off)."""
SWEEP_SECONDS = 60.0
COUNT_SECONDS = 600.0
"""With retention off the sweep only counts (a listing costs `weed` ~12 µs per batch): every
10 minutes, and no more once it has warned."""
VACUUM_SECONDS = 120.0
POSITIONS_TIMEOUT = 60.0
_DELETE_CHUNK = 1000  # S3 DeleteObjects takes at most 1,000 keys
_KEY = re.compile(
    r"^clusters/(?P<cluster>[^/]+)/topics/(?P<topic>[^/]+)/partitions/(?P<partition>\d{10})"
    r"/records/(?P<base>\d{20})\.batch$"
)

Partition = tuple[str, int]


@dataclass(frozen=True)
class Batch:
    """One batch object of the log."""

    key: str
    topic: str
    partition: int
    base_offset: int
    modified: datetime


def parse_batch(key: str, modified: datetime, cluster: str = CLUSTER) -> Batch | None:
    """The batch an object key names (``None``: another object, or another cluster's)."""
    match = _KEY.match(key)
    if match is None or match["cluster"] != cluster:
        return None
    return Batch(key, match["topic"], int(match["partition"]), int(match["base"]), modified)


def by_partition(batches: Iterable[Batch]) -> dict[Partition, list[Batch]]:
    """The batches of each partition in offset order."""
    grouped: dict[Partition, list[Batch]] = defaultdict(list)
    for batch in batches:
        grouped[(batch.topic, batch.partition)].append(batch)
    for partition in grouped.values():
        partition.sort(key=lambda batch: batch.base_offset)
    return dict(grouped)


def trimmable(
    batches: Sequence[Batch], older_than: datetime, needed_from: int | None
) -> list[Batch]:
    """The oldest batches of one partition (in offset order) that may go: each written
    before ``older_than`` and, unless ``needed_from`` is ``None`` (nobody in the stack reads
    the topic), wholly below ``needed_from``, the lowest position a consumer still needs — a
    batch ends where the next one starts. A prefix only, and never the last batch."""
    gone: list[Batch] = []
    for batch, following in zip(batches, batches[1:], strict=False):
        if batch.modified >= older_than:
            break
        if needed_from is not None and following.base_offset > needed_from:
            break
        gone.append(batch)
    return gone


def duration_text(duration: timedelta) -> str:
    """``2h``, ``90m``, ``7d``, ``45s``: the largest unit that divides it."""
    seconds = int(duration.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def crowded(partitions: dict[Partition, list[Batch]], limit: int) -> list[tuple[Partition, int]]:
    """The partitions holding more than ``limit`` batches, with their counts, largest first."""
    found = [(name, len(batches)) for name, batches in partitions.items() if len(batches) > limit]
    return sorted(found, key=lambda item: -item[1])


@dataclass
class Sweep:
    """What one pass found and did."""

    batches: int = 0
    trimmed: int = 0
    crowded: list[tuple[Partition, int]] | None = None


Positions = Callable[[], dict[Partition, int]]
"""Per partition of each topic the stack consumes, the lowest offset a consumer still needs;
topics missing from it are read by nobody in the stack (age alone decides)."""


class LogRetention:
    """Sweeps the log's bucket every ``interval`` seconds on a daemon thread (see the module
    docstring). ``retention`` ``None``: count and warn only."""

    def __init__(
        self,
        client: Any,  # a boto3 S3 client for the bucket's endpoint
        bucket: str,
        retention: timedelta | None,
        positions: Positions,
        echo: Callable[[str], None],
        interval: float = SWEEP_SECONDS,
        cluster: str = CLUSTER,
        vacuum: Callable[[], None] | None = None,
        topics: Collection[str] | None = None,
        guarded: Collection[str] = (),
    ) -> None:
        self.topics = None if topics is None else frozenset(topics)
        """The stack's own topics: nothing else on the broker is touched (``None``: all)."""
        self.guarded = frozenset(guarded)
        """Topics read by services of the stack: trimmed only below their positions, and
        not at all where ``positions`` does not give one."""
        self.client = client
        self.bucket = bucket
        self.retention = retention
        self.positions = positions
        self.echo = echo
        self.interval = interval
        self.cluster = cluster
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: set[Partition] = set()
        self._trimmed = 0
        self.vacuum = vacuum
        """Gives the trimmed batches' disk back (weed keeps it until its volumes are
        compacted): called after trimming, at most every ``VACUUM_SECONDS``."""
        self._vacuumed_at = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="log-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        interval = (
            self.interval if self.retention is not None else max(self.interval, COUNT_SECONDS)
        )
        failing = False
        while not self._stop.wait(interval):
            try:
                self.sweep()
                failing = False
            except Exception as exc:  # a store or database away: the next sweep tries again
                log.warning("log retention sweep failed: %r", exc)
                if not failing:  # said when it starts failing, not at every minute
                    self.echo(f"retention   a sweep failed, trying again each minute: {exc}")
                failing = True
            if self.retention is None and self._warned:
                return  # said once; counting again would only cost weed

    def sweep(self, now: datetime | None = None) -> Sweep:
        """List the log, delete what :func:`trimmable` gives up, warn about crowded
        partitions."""
        now = now or datetime.now(UTC)
        partitions = {
            name: batches
            for name, batches in by_partition(self._list()).items()
            if self.topics is None or name[0] in self.topics
        }
        result = Sweep(batches=sum(len(batches) for batches in partitions.values()))
        if self.retention is not None:
            needed = self.positions()
            gone = [
                batch
                for name, batches in partitions.items()
                # a partition of a consumed topic whose positions are not known waits
                if name in needed or name[0] not in self.guarded
                for batch in trimmable(batches, now - self.retention, needed.get(name))
            ]
            self._delete([batch.key for batch in gone])
            result.trimmed = len(gone)
            if gone and not self._trimmed:
                self.echo(f"retention   first {len(gone):,} batches trimmed from the log's start")
            self._trimmed += len(gone)
            if gone and self.vacuum is not None and time.monotonic() >= self._vacuumed_at:
                self._vacuumed_at = time.monotonic() + VACUUM_SECONDS
                self.vacuum()
            for batch in gone:
                partitions[(batch.topic, batch.partition)].remove(batch)
        result.crowded = crowded(partitions, CROWDED_BATCHES)
        fresh = [(name, count) for name, count in result.crowded if name not in self._warned]
        if fresh:
            self._warned.update(name for name, _ in fresh)
            (topic, partition), count = fresh[0]
            why = (
                "set --broker-retention"
                if self.retention is None
                else "retention keeps what a service has not consumed yet: is one stopped?"
            )
            self.echo(
                f"warning     the log's partition {topic}[{partition}] holds {count:,} batches; "
                "Tansu lists them all on every fetch, so consumers slow down and then stop "
                f"as it grows: {why} (see README, 'Durable local log')"
            )
        return result

    def _list(self) -> Iterable[Batch]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"clusters/{self.cluster}/topics/"
        )
        for page in pages:
            for item in page.get("Contents", ()):
                batch = parse_batch(item["Key"], item["LastModified"], self.cluster)
                if batch is not None:
                    yield batch

    def _delete(self, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), _DELETE_CHUNK):
            chunk = keys[start : start + _DELETE_CHUNK]
            answer = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True},
            )
            if answer.get("Errors"):
                errors = answer["Errors"]
                raise RuntimeError(f"{len(errors)} batches not deleted: {errors[:3]}")


@dataclass(frozen=True)
class Readers:
    """Who in the stack reads a topic: consumer groups whose offsets the broker keeps (the
    pricer's) and consumers whose offsets are in ``consumer_offsets`` (projector, quota)."""

    groups: tuple[str, ...] = ()
    stored: tuple[str, ...] = ()


def lowest_needed(positions: Sequence[int | None]) -> int:
    """What a partition's readers still need: the lowest of their positions, 0 when any of
    them has none yet (it has read nothing, or never ran)."""
    return min((p if p is not None and p >= 0 else 0 for p in positions), default=0)


async def stack_positions(
    database_url: str, bootstrap: str, readers: dict[str, Readers]
) -> dict[Partition, int]:
    """Per partition of each topic in ``readers``, the lowest offset one of its readers
    still needs (:func:`lowest_needed`), for :class:`LogRetention`."""
    from aiokafka import TopicPartition

    from services.adapters.database import connect
    from services.adapters.kafka import make_admin
    from services.adapters.readmodels import REBUILD_LOCK

    connection = await connect(database_url, timeout=10)  # with the settings' TLS
    try:
        # Not while `billing rebuild` reads the log: it reads from offset 0 up to the
        # projector's position, below which this would delete (its advisory lock).
        if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", REBUILD_LOCK):
            raise RuntimeError("a rebuild is reading the log: nothing trimmed this time")
        await connection.execute("SELECT pg_advisory_unlock($1)", REBUILD_LOCK)
        rows = await connection.fetch(
            "SELECT consumer, topic, partition, next_offset FROM consumer_offsets"
            " WHERE topic = ANY($1::text[])",
            list(readers),
        )
    finally:
        await connection.close()
    stored = {(r["consumer"], r["topic"], r["partition"]): int(r["next_offset"]) for r in rows}
    needed: dict[Partition, int] = {}
    admin = make_admin(bootstrap)
    try:
        await admin.start()
        for topic, who in readers.items():
            partitions = await _partitions(admin, topic)
            tps = [TopicPartition(topic, p) for p in partitions]
            committed = [
                await admin.list_consumer_group_offsets(group, partitions=tps)
                for group in who.groups
            ]
            for p, tp in zip(partitions, tps, strict=True):
                positions = [stored.get((name, topic, p)) for name in who.stored]
                positions += [(c[tp].offset if tp in c else None) for c in committed]
                needed[(topic, p)] = lowest_needed(positions)
    finally:
        await admin.close()
    return needed


async def _partitions(admin: Any, topic: str) -> list[int]:
    described = (await admin.describe_topics([topic]))[0]
    if described.get("error_code") or not described.get("partitions"):
        raise RuntimeError(f"the broker did not describe {topic}: {described.get('error_code')}")
    return sorted(p["partition"] for p in described["partitions"])


def positions_of(database_url: str, bootstrap: str, readers: dict[str, Readers]) -> Positions:
    """:func:`stack_positions` as the synchronous callable :class:`LogRetention` takes."""
    return lambda: asyncio.run(
        asyncio.wait_for(stack_positions(database_url, bootstrap, readers), POSITIONS_TIMEOUT)
    )
