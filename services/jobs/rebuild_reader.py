"""Reading the cost topic for ``billing rebuild``: every partition from offset 0 up to given
offsets (or until it goes quiet), each decoded event staged as a transaction row.

``services.jobs.rebuild`` tells the whole story; this is the part that talks to Kafka. Rows
are staged into the ``STAGING`` table (which the rebuild creates) in ``STAGED_COLUMNS``
order: the ``billing_transactions`` row plus where the event sat in the log and in which
phase it was read (1 before the swap transaction, 2 inside it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from services.adapters.readmodels import TRANSACTION_COLUMNS, transaction_row
from services.jobs.rebuild_tables import RebuildError

# aiokafka, asyncpg and pydantic are imported where used: the CLI imports the rebuild job
# whenever it starts (``billing quote --batch`` must stay fast).
if TYPE_CHECKING:
    import asyncpg
    from aiokafka import AIOKafkaConsumer, ConsumerRecord

STAGING = "rebuild_events"
STAGED_COLUMNS = (*TRANSACTION_COLUMNS, "log_partition", "log_offset", "phase")
CHUNK = 5000
"""Records fetched (and rows staged) at a time."""
STALL_SECONDS = 15.0
"""Reading up to a committed offset that does not come for this long: the log is short."""

Progress = Callable[[int, int | None], None]
"""(records just read, estimated total or None)."""


class LogReader:
    """Reads partitions from offset 0 up to given offsets, staging every decoded event."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        connection: asyncpg.Connection,
        topic: str,
        partitions: Sequence[int],
        progress: Progress | None,
    ) -> None:
        self.consumer = consumer
        self.connection = connection
        self.topic = topic
        self.next = dict.fromkeys(partitions, 0)
        """Per partition, the offset to read next (everything below it is staged)."""
        self.progress = progress
        self.records_read = 0
        self.undecodable = 0
        """Records the projector dead-letters (never applied, so never staged)."""
        self.rows: list[tuple[Any, ...]] = []
        self.started: set[int] = set()

    def behind(self, offsets: Mapping[int, int]) -> int:
        return sum(max(0, offsets.get(p, 0) - n) for p, n in self.next.items())

    async def read(
        self, stops: Mapping[int, int | None], *, phase: int, quiet: float | None = None
    ) -> None:
        """Read each partition up to ``stops[p]``, or, where that is None, until ``quiet``
        seconds pass with nothing new. A bounded partition that stops short (no progress
        for ``STALL_SECONDS``) is an error: the log no longer holds what the projector
        applied."""
        from aiokafka import TopicPartition

        quiet = STALL_SECONDS if quiet is None else quiet

        active = {p for p, stop in stops.items() if stop is None or self.next[p] < stop}
        if not active:
            return
        tps = {p: TopicPartition(self.topic, p) for p in active}
        self.consumer.assign(list(tps.values()))
        for p, tp in tps.items():
            self.consumer.seek(tp, self.next[p])
        total = sum(s for s in stops.values() if s is not None) or None
        moved_at = time.monotonic()
        while active:
            fetched = await self.consumer.getmany(
                *(tps[p] for p in active), timeout_ms=200, max_records=CHUNK
            )
            taken = 0
            for tp, records in fetched.items():
                taken += self._take(records, stops[tp.partition], phase)
            if len(self.rows) >= CHUNK:
                await self.flush()
            moved = False
            for p in sorted(active):
                stop = stops[p]
                # The consumer's position also steps over offsets that hold no record.
                position = await self.consumer.position(tps[p])
                reached = position if stop is None else min(position, stop)
                if reached > self.next[p]:
                    self.next[p], moved = reached, True
                if stop is not None and self.next[p] >= stop:
                    active.discard(p)
            if taken:
                self.records_read += taken
                if self.progress is not None:
                    if total is None:  # reading to the end: the fetched high watermarks
                        marks = [self.consumer.highwater(tp) for tp in tps.values()]
                        total = sum(m for m in marks if m is not None) or None
                    self.progress(taken, total)
            if moved:
                moved_at = time.monotonic()
            elif time.monotonic() - moved_at > quiet:
                if any(stops[p] is not None for p in active):
                    stuck = ", ".join(f"{p} at {self.next[p]} of {stops[p]}" for p in active)
                    raise RebuildError(
                        f"{self.topic} ends before the offsets the projector applied "
                        f"(partition {stuck}): the log no longer holds what the read models "
                        "were built from"
                    )
                break

    def _take(self, records: list[ConsumerRecord], stop: int | None, phase: int) -> int:
        """Stage the records below ``stop``; return how many there were."""
        from services.core.events import decode_priced

        taken = 0
        for record in records:
            p, offset = record.partition, record.offset
            if stop is not None and offset >= stop:
                break
            if offset < self.next[p]:
                continue  # already staged (never expected after a seek)
            if p not in self.started:
                if offset != 0:
                    raise RebuildError(
                        f"{self.topic}[{p}] starts at offset {offset}, not 0 (retention?): "
                        "the read models cannot be re-derived from what is left"
                    )
                self.started.add(p)
            taken += 1
            try:
                event = decode_priced(record.value)
            except Exception:  # the projector dead-letters these: never applied
                self.undecodable += 1
                continue
            self.rows.append((*transaction_row(event), p, offset, phase))
        return taken

    async def flush(self) -> None:
        if self.rows:
            await self.connection.copy_records_to_table(
                STAGING, records=self.rows, columns=STAGED_COLUMNS
            )
            self.rows = []


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    """The partitions of ``topic``; RebuildError if it does not exist."""
    # All topics, never this one by name: Tansu would create a missing topic.
    if topic not in await consumer.topics():
        raise RebuildError(f"topic {topic} does not exist (is BILLING_TOPIC_PREFIX right?)")
    return sorted(consumer.partitions_for_topic(topic) or ())
