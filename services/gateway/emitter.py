"""Usage emission off the request path: an in-process queue, a batching producer, a spool.

A proxied request hands its ``UsageRecorded`` to :meth:`Emitter.submit` (or a function that
estimates it to :meth:`Emitter.submit_later`) and returns at once; nothing on the request
path waits for the broker. One background task sends the queue to Kafka in batches
(acks=all), waiting ``linger`` seconds (20 ms) after the first event of a batch so that a
batch carries more than one event. When a send fails the batch goes to the fsync'd
:class:`Spool` and, while the broker stays away, so does every later batch; a second task
re-sends the spool oldest first and, once a segment is acknowledged, deletes it — its first
success also sends live traffic back to the broker. Shutdown sends what is queued, and
spools what it cannot.

The queue is bounded by refusing new work rather than dropping it: :attr:`accepting` is
false while the queue is over ``max_queue`` or, when ``reject_when_full``, the spool is
over ``spool_max_bytes``; the proxy answers 503 then. A request already answered is always
taken.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import TypeAlias

from services.adapters import metrics
from services.adapters.errors import PublishError
from services.adapters.publisher import EventPublisher
from services.core.backoff import Backoff
from services.core.events import UsageRecorded
from services.gateway.spool import Spool

log = logging.getLogger("billing.emitter")
SEND_TIMEOUT_SECONDS = 5.0
"""A send the broker has not acknowledged by then goes to the spool (and may land twice:
the pipeline de-duplicates by request_id)."""

Pending: TypeAlias = UsageRecorded | Callable[[], UsageRecorded | None]


class Emitter:
    def __init__(
        self,
        publisher: Callable[[], EventPublisher | None],
        topic: str,
        spool: Spool,
        *,
        max_queue: int = 100_000,
        batch_max: int = 500,
        linger: float = 0.02,
        spool_max_bytes: int = 1 << 30,
        reject_when_full: bool = True,
    ) -> None:
        self._publisher = publisher
        self.topic = topic
        self.spool = spool
        self.max_queue = max_queue
        self.batch_max = batch_max
        self.linger = linger
        self.spool_max_bytes = spool_max_bytes
        self.reject_when_full = reject_when_full
        self._queue: deque[tuple[float, Pending]] = deque()
        self._ready = asyncio.Event()
        self._spooled = asyncio.Event()
        self.in_flight: list[UsageRecorded] = []
        self._in_flight_since: float | None = None
        self.broker_up = True
        self.spool_failing = False
        self._tasks: list[asyncio.Task[None]] = []

    # -- the request side ----------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """Whether a new request may start (its usage would have room)."""
        if len(self._queue) >= self.max_queue or self.spool_failing:
            return False
        return not (self.reject_when_full and self.spool.size_bytes > self.spool_max_bytes)

    def submit(self, event: UsageRecorded) -> None:
        """Take one event; never blocks, never drops."""
        self._queue.append((time.time(), event))
        self._ready.set()

    def submit_later(self, build: Callable[[], UsageRecorded | None]) -> None:
        """Take a function that builds the event (a tokenizer estimate: CPU work, run in a
        worker thread by the background task rather than on the request path)."""
        self._queue.append((time.time(), build))
        self._ready.set()

    # -- background ----------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.spool.open)
        if not self.spool.empty:
            self._spooled.set()
        self._tasks = [asyncio.create_task(self._send_live()), asyncio.create_task(self._resend())]

    async def _send_live(self) -> None:
        while True:
            await self._ready.wait()
            if self.linger and len(self._queue) < self.batch_max:
                # Gather a fuller batch first: each send is a produce request with its own
                # round trip through aiokafka, and at a few hundred requests/s one per event
                # cost the gateway more CPU than the event itself.
                await asyncio.sleep(self.linger)
            batch = await self._take(self.batch_max)
            if not batch:
                continue
            self.in_flight = batch
            if not (self.broker_up and await self._publish(batch)):
                await self._to_spool(batch)
            # Cleared only once the batch is acknowledged or on disk: a shutdown that cancels
            # this task mid-send finds the batch here and spools it.
            self.in_flight = []
            self._in_flight_since = None

    async def _take(self, limit: int) -> list[UsageRecorded]:
        """Up to ``limit`` queued events, estimates resolved (in a worker thread).

        They leave the queue only once resolved, so a cancellation cannot lose them."""
        items = [item for _, item in islice(self._queue, limit)]
        if self._queue:
            self._in_flight_since = self._queue[0][0]
        events = (
            await asyncio.to_thread(_resolve, items)
            if any(callable(item) for item in items)
            else items
        )
        for _ in items:
            self._queue.popleft()
        if not self._queue:
            self._ready.clear()
        return events  # type: ignore[return-value]  # resolved above

    async def _publish(self, batch: list[UsageRecorded]) -> bool:
        publisher = self._publisher()
        if publisher is None:
            self.broker_up = False
            return False
        try:
            await publisher.publish(self.topic, batch, SEND_TIMEOUT_SECONDS)
        except Exception as exc:  # PublishError, or a client bug: spool, don't drop
            if not isinstance(exc, PublishError):
                log.exception("unexpected error sending usage; spooling the batch")
            if self.broker_up:
                log.warning("broker unavailable (%r): spooling to %s", exc, self.spool.directory)
            self.broker_up = False
            return False
        metrics.INGESTED.inc(len(batch))
        return True

    async def _to_spool(self, batch: list[UsageRecorded]) -> None:
        """Write ``batch`` to the spool, retrying until it is on disk (a full or failing
        disk stops new requests meanwhile: :attr:`accepting` is false)."""
        backoff = Backoff()
        while True:
            try:
                await asyncio.to_thread(self.spool.append, batch)
            except OSError as exc:
                if not self.spool_failing:
                    log.error("cannot write the usage spool (%r); refusing new requests", exc)
                self.spool_failing = True
                await asyncio.sleep(backoff.next())
                continue
            if self.spool_failing:
                log.info("the usage spool is writable again")
            self.spool_failing = False
            metrics.SPOOLED.inc(len(batch))
            self._spooled.set()
            return

    async def _resend(self) -> None:
        """Re-send spooled segments, oldest first; the first success means the broker is back."""
        backoff = Backoff()
        while True:
            await self._spooled.wait()
            self._spooled.clear()
            for segment in await asyncio.to_thread(self.spool.sealed):
                try:
                    sent = await self._resend_segment(segment)
                except OSError as exc:  # the segment cannot be read or removed: try again
                    log.error("cannot re-send spool segment %s: %r", segment, exc)
                    sent = False
                if not sent:
                    self._spooled.set()
                    await asyncio.sleep(backoff.next())
                    break
                backoff.reset()
                if not self.broker_up:
                    log.info("broker is back: usage goes to it again")
                self.broker_up = True

    async def _resend_segment(self, segment: Path) -> bool:
        """Send one sealed segment, a batch at a time (never all of it in memory)."""
        batches = self.spool.read(segment, self.batch_max)
        while batch := await asyncio.to_thread(next, batches, None):
            publisher = self._publisher()
            if publisher is None:
                return False
            try:
                await publisher.publish(self.topic, batch, SEND_TIMEOUT_SECONDS)
            except PublishError as exc:
                log.debug("re-sending spool failed: %r", exc)
                return False
            metrics.INGESTED.inc(len(batch))
            metrics.RESENT.inc(len(batch))
        await asyncio.to_thread(self.spool.remove, segment)
        return True

    # -- observation and shutdown --------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._queue) + len(self.in_flight)

    def observe(self) -> None:
        """Publish queue depth, spool size and the oldest unsent event's age."""
        metrics.EMIT_QUEUE_DEPTH.set(self.depth)
        metrics.SPOOL_BYTES.set(self.spool.size_bytes)
        candidates = [self.spool.oldest, self._in_flight_since]
        if self._queue:
            candidates.append(self._queue[0][0])
        oldest = min((t for t in candidates if t is not None), default=None)
        metrics.EMIT_OLDEST_AGE.set(0 if oldest is None else max(0.0, time.time() - oldest))

    async def close(self, timeout: float = 10.0) -> None:
        """Send what is queued while ``timeout`` allows; spool the rest; stop."""
        deadline = time.monotonic() + timeout
        while self.depth and self.broker_up and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        for outcome in await asyncio.gather(*self._tasks, return_exceptions=True):
            if isinstance(outcome, Exception):
                log.error("the emitter stopped on %r", outcome)
        # A batch cancelled mid-send may have reached the broker: spooling it too is safe
        # (de-duplicated downstream), dropping it is not.
        leftover = list(self.in_flight) + await self._take(len(self._queue))
        if leftover:
            await asyncio.to_thread(self.spool.append, leftover)
            metrics.SPOOLED.inc(len(leftover))
            log.warning("spooled %d unsent usage events at shutdown", len(leftover))
        await asyncio.to_thread(self.spool.close)


def _resolve(items: list[Pending]) -> list[UsageRecorded]:
    """Build the estimated events; one that fails is counted and logged, not the batch's end."""
    events: list[UsageRecorded] = []
    for item in items:
        if callable(item):
            try:
                event = item()
            except Exception:
                log.exception("an estimated usage event could not be built")
                metrics.UNBILLABLE.labels(reason="estimate_failed").inc()
                continue
        else:
            event = item
        if event is not None:
            events.append(event)
    return events
