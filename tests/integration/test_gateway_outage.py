"""The broker goes away under proxied traffic: the gateway keeps serving, spools, re-sends.

Everything runs as real processes: the gateway, the fake upstream, the pricer and the
projector. The embedded broker keeps its log in memory, so its outage is made by cutting
the network to it (a TCP proxy every client, the gateway included, connects through —
the broker advertises the proxy's port): clients see what they would of a stopped broker,
and the log survives, as a real Kafka's does over a restart. In the middle of the outage the
gateway is SIGKILLed and started again on the same spool. At the end every request the
gateway answered is billed exactly once.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from services.adapters.kafka import ensure_topics
from services.local.broker import EmbeddedBroker, _free_port
from tests.integration.pipeline import FlakyProxy, Pipeline, billed_totals
from tests.integration.test_proxy import CHAT, make_key

pytestmark = pytest.mark.integration


async def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert asyncio.get_running_loop().time() < deadline, f"{url} did not come up"
            await asyncio.sleep(0.1)


def gauge(exposition: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", exposition, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


class Stack:
    def __init__(self, pipeline: Pipeline, upstream_port: int) -> None:
        self.pipeline = pipeline
        self.gateway_port = _free_port()
        self.upstream_port = upstream_port
        self.url = f"http://127.0.0.1:{self.gateway_port}"

    async def start_gateway(self) -> None:
        self.pipeline.start(
            "gateway",
            "--port",
            str(self.gateway_port),
            env={
                "OPENROUTER_BASE_URL": f"http://127.0.0.1:{self.upstream_port}/api/v1",
                "BILLING_SPOOL_DIR": str(self.pipeline.workdir / "spool"),
            },
        )
        await wait_http(f"{self.url}/healthz")

    async def metrics(self) -> str:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{self.url}/metrics")).text


@pytest.fixture
async def stack(database_url: str, topic_prefix: str, tmp_path: Path) -> AsyncIterator[Stack]:
    proxy = FlakyProxy("127.0.0.1", 0)
    await proxy.start()
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log", advertised_port=proxy.port)
    broker.start()
    proxy.target = ("127.0.0.1", broker.port)
    bootstrap = f"127.0.0.1:{proxy.port}"
    pipeline = Pipeline(bootstrap, database_url, topic_prefix, tmp_path)
    await ensure_topics(bootstrap, pipeline.topics.partitions())
    upstream_port = _free_port()
    pipeline.start("fake-upstream", "--port", str(upstream_port), "--completion-tokens", "30")
    pipeline.start("pricer")
    pipeline.start("projector")
    running = Stack(pipeline, upstream_port)
    running.proxy = proxy  # type: ignore[attr-defined]
    try:
        await wait_http(f"http://127.0.0.1:{upstream_port}/healthz")
        await running.start_gateway()
        yield running
    finally:
        pipeline.stop_all()
        await proxy.cut()
        broker.stop()


async def send(stack: Stack, key: str, count: int, tag: str) -> set[str]:
    """``count`` completions, half of them streamed; the request ids the gateway answered."""
    auth = {"Authorization": f"Bearer {key}"}

    async def one(client: httpx.AsyncClient, n: int) -> str:
        body = {**CHAT, "stream": n % 2 == 0, "user": f"{tag}-{n}"}
        response = await client.post("/v1/chat/completions", json=body, headers=auth)
        assert response.status_code == 200, response.text
        return response.headers["x-billing-request-id"]

    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        return set(await asyncio.gather(*(one(client, n) for n in range(count))))


async def billed_ids(database_url: str) -> list[str]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT request_id FROM billing_transactions")
    finally:
        await connection.close()
    return [r[0] for r in rows]


async def test_broker_outage_and_gateway_crash_lose_and_double_nothing(
    stack: Stack, database_url: str
) -> None:
    proxy: FlakyProxy = stack.proxy  # type: ignore[attr-defined]
    key = await make_key(database_url)
    served = await send(stack, key, 40, "before")

    await proxy.cut()  # the broker is gone for every client
    served |= await send(stack, key, 60, "during")
    deadline = asyncio.get_running_loop().time() + 30
    while True:  # wait until the gateway has put everything on disk
        exposition = await stack.metrics()
        if gauge(exposition, "billing_emit_queue_depth") == 0 and gauge(
            exposition, "billing_spool_bytes"
        ):
            break
        assert asyncio.get_running_loop().time() < deadline, exposition[-2000:]
        await asyncio.sleep(0.2)

    stack.pipeline.kill("gateway")  # SIGKILL, mid-outage: only the spool remembers
    await stack.start_gateway()
    served |= await send(stack, key, 30, "after-crash")
    assert len(served) == 130

    await proxy.start()  # the broker is back
    deadline = asyncio.get_running_loop().time() + 120
    while len(billed := await billed_ids(database_url)) < len(served):
        assert asyncio.get_running_loop().time() < deadline, (
            f"{len(billed)}/{len(served)} billed\n{stack.pipeline.log('gateway')}"
            f"\n--- pricer\n{stack.pipeline.log('pricer')}"
        )
        await asyncio.sleep(0.5)
    await asyncio.sleep(2)  # anything re-sent twice would land by now

    billed = await billed_ids(database_url)
    assert sorted(billed) == sorted(served)  # nothing lost, nothing doubled
    count, rows, summary = await billed_totals(database_url)
    assert count == len(served) and summary == rows
    exposition = await stack.metrics()
    assert gauge(exposition, "billing_spool_bytes") == 0
    # the restarted gateway sent the first one's spool and its own outage traffic from disk
    # (a batch caught in flight by the cut is spooled too, and de-duplicated downstream)
    assert gauge(exposition, "billing_spool_resent_events_total") >= 90
    assert gauge(exposition, "billing_emit_oldest_unsent_seconds") == 0
    assert not list((stack.pipeline.workdir / "spool").glob("0*.jsonl"))
