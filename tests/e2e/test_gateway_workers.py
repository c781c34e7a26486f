"""``billing gateway --workers 2``: two processes behind one port, each with its own spool,
every answered request billed once, a SIGKILLed worker replaced and its spool taken over."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.adapters.kafka import ensure_topics
from services.core.events import decode_recorded
from services.gateway.spool import slot_directory
from tests.conftest import migrated_database
from tests.e2e.test_cli import BILLING, _free_port
from tests.e2e.test_openai_sdk import UNSAFE_ENV, _spawn, _wait_until_ok
from tests.integration.pipeline import Pipeline
from tests.integration.test_ingest import read_all

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


class Workers:
    def __init__(self, pipeline: Pipeline, url: str, spool: Path, key: str) -> None:
        self.pipeline = pipeline
        self.url = url
        self.spool = spool
        self.key = key
        self.sent = 0
        """Completions answered so far (each must be on the usage topic exactly once)."""

    def pids(self, tries: int = 40) -> set[int]:
        """The pids answering /healthz over new connections (the kernel spreads them)."""
        found = set()
        for _ in range(tries):
            with httpx.Client(timeout=5) as client:  # a new connection each time
                found.add(client.get(f"{self.url}/healthz").json()["pid"])
        return found

    def chat(self, count: int) -> list[str]:
        """``count`` completions, each on a new connection; their billing request ids."""
        ids = []
        for _ in range(count):
            with httpx.Client(timeout=30) as client:
                answer = client.post(
                    f"{self.url}/v1/chat/completions",
                    json=CHAT,
                    headers={"Authorization": f"Bearer {self.key}"},
                )
            assert answer.status_code == 200, answer.text
            ids.append(answer.headers["x-billing-request-id"])
        self.sent += count
        return ids

    def billed(self) -> list[str]:
        """Request ids of the usage events on the topic (waits for one per completion)."""
        topic = self.pipeline.topics.usage
        values = asyncio.run(read_all(self.pipeline.bootstrap, topic, self.sent))
        return [decode_recorded(v).request_id for v in values]


def _held(directory: Path) -> bool:
    """Whether some process holds the spool's lock."""
    with (directory / ".lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


@pytest.fixture(scope="module")
def workers(
    postgres_server: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workers]:
    workdir = tmp_path_factory.mktemp("workers")
    prefix = f"w{uuid.uuid4().hex[:10]}."
    with migrated_database(postgres_server, "workers") as database_url:
        pipeline = Pipeline(kafka_bootstrap, database_url, prefix, workdir)
        try:
            asyncio.run(ensure_topics(kafka_bootstrap, pipeline.topics.partitions()))
            env = {k: v for k, v in pipeline.env().items() if k not in UNSAFE_ENV}
            for args in (["tenants", "create", "acme"], ["keys", "create", "--tenant", "acme"]):
                done = subprocess.run([BILLING, *args], env=env, capture_output=True, text=True)
                assert done.returncode == 0, done.stderr
            key = done.stdout.strip()  # the key create printed
            fake_port = _free_port()
            _spawn(pipeline, "fake-upstream", ["fake-upstream", "--port", str(fake_port)], env)
            _wait_until_ok(f"http://127.0.0.1:{fake_port}/api/v1/models", pipeline, "fake-upstream")
            port = _free_port()
            spool = workdir / "spool"
            gateway_env = env | {
                "OPENROUTER_BASE_URL": f"http://127.0.0.1:{fake_port}/api/v1",
                "BILLING_SPOOL_DIR": str(spool),
                "BILLING_DATA_DIR": str(workdir / "data"),
            }
            command = ["gateway", "--port", str(port), "--workers", "2"]
            _spawn(pipeline, "gateway", command, gateway_env)
            url = f"http://127.0.0.1:{port}"
            _wait_until_ok(f"{url}/readyz", pipeline, "gateway")
            yield Workers(pipeline, url, spool, key)
        finally:
            pipeline.stop_all()


def test_two_workers_share_the_port_and_bill_every_request_once(workers: Workers) -> None:
    deadline = time.monotonic() + 30
    while len(pids := workers.pids()) < 2:  # the second worker may still be starting
        assert time.monotonic() < deadline, f"one worker answers: {pids}"
    assert os.getpid() not in pids
    assert _held(slot_directory(workers.spool, 0)) and _held(slot_directory(workers.spool, 1))
    ids = workers.chat(40)
    billed = workers.billed()
    assert sorted(billed) == sorted(ids)  # each once: none lost, none doubled
    metrics = httpx.get(f"{workers.url}/metrics", timeout=5).text
    assert "billing_ingested_events_total" in metrics  # gathered across the workers


def test_a_killed_worker_is_replaced_and_takes_over_its_spool(workers: Workers) -> None:
    before = workers.pids()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # the supervisor starts a new worker in the dead one's place
        pids = workers.pids()
        if len(pids) == 2 and victim not in pids:
            break
        assert time.monotonic() < deadline, f"no replacement worker: {pids}\n" + (
            workers.pipeline.log("gateway")
        )
        time.sleep(0.5)
    assert _held(slot_directory(workers.spool, 0)) and _held(slot_directory(workers.spool, 1))
    ids = workers.chat(20)
    billed = workers.billed()
    assert len(billed) == workers.sent  # nothing doubled by the takeover
    assert all(billed.count(i) == 1 for i in ids)
