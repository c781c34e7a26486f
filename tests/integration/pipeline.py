"""A harness for pipeline tests: the pricer and projector as real child processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from aiokafka import ConsumerRecord

from services.adapters.kafka import make_consumer, make_producer
from services.adapters.topics import Topics
from services.core.events import UsageRecorded
from services.core.pricebook import InMemoryPriceBook
from services.core.rating import rate
from tests.integration.test_projector_apply import T0, recorded

BILLING = shutil.which("billing", path=os.path.dirname(sys.executable)) or "billing"


@dataclass
class Pipeline:
    bootstrap: str
    database_url: str
    prefix: str
    workdir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def topics(self) -> Topics:
        return Topics.named(self.prefix)

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "BILLING_KAFKA_BOOTSTRAP": self.bootstrap,
            "BILLING_DATABASE_URL": self.database_url,
            "BILLING_TOPIC_PREFIX": self.prefix,
            "BILLING_DATA_DIR": str(self.workdir),
            "BILLING_CATALOGUE_SYNC": "false",
        }

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        """Run ``billing NAME ARGS…`` (``env`` adds to the pipeline's environment)."""
        log = (self.workdir / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [BILLING, name, *args],
            env=self.env() | (env or {}),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop_all(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def facts(count: int, seed: int = 1) -> list[UsageRecorded]:
    rng = random.Random(seed)
    return [recorded(n, rng) for n in range(count)]


def expected_totals(items: list[UsageRecorded], book: InMemoryPriceBook) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = {}
    for item in items:
        cost = rate(item, book, priced_at=T0).total_cost
        totals[item.tenant_id] = totals.get(item.tenant_id, Decimal(0)) + cost
    return totals


async def produce(bootstrap: str, topic: str, values: list[tuple[bytes, bytes | None]]) -> None:
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        pending = [await producer.send(topic, value, key=key) for key, value in values]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def billed_totals(database_url: str) -> tuple[int, dict[str, Decimal], dict[str, Decimal]]:
    """(transactions, per-tenant totals from the rows, per-tenant totals from the summary)."""
    connection = await asyncpg.connect(database_url)
    try:
        count = await connection.fetchval("SELECT count(*) FROM billing_transactions")
        rows = await connection.fetch(
            "SELECT tenant_id, sum(total_cost) AS t FROM billing_transactions GROUP BY 1"
        )
        summary = await connection.fetch(
            "SELECT tenant_id, sum(total_cost) AS t FROM tenant_billing_summary GROUP BY 1"
        )
    finally:
        await connection.close()
    return int(count), {r[0]: r[1] for r in rows}, {r[0]: r[1] for r in summary}


async def read_records(
    bootstrap: str, topic: str, count: int, timeout: float = 20.0
) -> list[ConsumerRecord]:
    """The records of ``topic`` from its start, once ``count`` arrived or ``timeout`` passed
    (then what did; callers assert on it). Nothing is committed: every call reads from 0."""
    consumer = make_consumer(bootstrap, topic, group_id=f"{topic}.reader")
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(records) < count and asyncio.get_running_loop().time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """Wait until ``check()`` is true; ``TimeoutError`` after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.2)


async def wait_for_count(pipeline: Pipeline, count: int, timeout: float = 90.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        done, _, _ = await billed_totals(pipeline.database_url)
        if done >= count:
            return
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(
                f"{done}/{count} projected in {timeout}s\n--- pricer\n{pipeline.log('pricer')}"
                f"\n--- projector\n{pipeline.log('projector')}"
            )
        await asyncio.sleep(0.1)


class FlakyProxy:
    """A TCP proxy (to PostgreSQL, to the broker) that can be cut (connections reset, port
    refusing) and started again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.links):
            writer.transport.abort()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.links.update({writer, up_writer})

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self.links.difference_update({writer, up_writer})
