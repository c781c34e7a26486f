"""Prepaid credits enforced at the gateway, through real processes (issue #11).

Four gateway processes behind one port (``billing gateway --workers 4``), the pricer, the
projector and the quota service, against a fake upstream whose requests are counted on the
wire: a tenant with $0.05 of credits sends 200 concurrent requests of ≈ $0.003 each with
``max_tokens`` set. Nothing is billed past $0.05, every refused request is a 402 that never
reached the upstream, and the ``openai`` SDK raises its status error with code 402. A second
gateway killed with SIGKILL while its lease holds a tenant's headroom: the headroom returns
once the lease expires. A cut stream and a client that leaves release their reservation.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal

import asyncpg
import httpx
import openai
import pytest

from services.adapters.kafka import ensure_topics
from tests.conftest import migrated_database
from tests.e2e.test_cli import BILLING, _free_port
from tests.e2e.test_openai_sdk import UNSAFE_ENV, Tap, _spawn, _wait_until_ok
from tests.integration.pipeline import Pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MODEL = "openai/gpt-4o"  # $2.50 / M input, $10 / M output in the bundled price list
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300}
FULL = {"x-fake-completion-tokens": "300"}  # the answer uses its whole output limit
LEASE_TTL = 3.0
"""The spare gateway's (the one killed): short, so its headroom returns quickly. The four
workers keep the default (15 s): a lease must outlive the longest stall of its process, and
on 2 busy cores a burst of 200 requests stalls event loops for seconds."""


@dataclass
class Stack:
    pipeline: Pipeline
    env: dict[str, str]
    url: str
    """Four workers behind one port."""
    spare: str
    """A second, single-process gateway (the one killed in the lease test)."""
    tap: Tap
    upstream: str

    def billing(self, *args: str) -> str:
        done = subprocess.run([BILLING, *args], env=self.env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def tenant(self, credits: str) -> str:
        """A new tenant with ``credits`` USD of credits; its API key."""
        name = f"t{uuid.uuid4().hex[:8]}"
        self.billing("tenants", "create", name)
        key = self.billing("keys", "create", "--tenant", name)
        self.billing("credits", "add", name, credits, "--reason", "e2e")
        return key

    def gateway(self, name: str, port: int, *extra: str, **settings: str) -> None:
        env = (
            self.env
            | settings
            | {
                "OPENROUTER_BASE_URL": f"http://127.0.0.1:{self.tap.port}/api/v1",
                "BILLING_SPOOL_DIR": str(self.pipeline.workdir / f"spool-{name}"),
            }
        )
        _spawn(self.pipeline, name, ["gateway", "--port", str(port), *extra], env)
        _wait_until_ok(f"http://127.0.0.1:{port}/readyz", self.pipeline, name)

    async def query(self, sql: str, *args: object) -> list[asyncpg.Record]:
        connection = await asyncpg.connect(self.pipeline.database_url)
        try:
            return list(await connection.fetch(sql, *args))
        finally:
            await connection.close()


@pytest.fixture(scope="module")
def stack(
    postgres_server: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("quota")
    prefix = f"q{uuid.uuid4().hex[:10]}."
    tap = None
    with migrated_database(postgres_server, "quota_e2e") as database_url:
        pipeline = Pipeline(kafka_bootstrap, database_url, prefix, workdir)
        try:
            asyncio.run(ensure_topics(kafka_bootstrap, pipeline.topics.partitions()))
            env = {k: v for k, v in pipeline.env().items() if k not in UNSAFE_ENV}
            fake_port = _free_port()
            _spawn(pipeline, "fake-upstream", ["fake-upstream", "--port", str(fake_port)], env)
            _wait_until_ok(f"http://127.0.0.1:{fake_port}/openapi.json", pipeline, "fake-upstream")
            tap = Tap(fake_port)
            for name in ("pricer", "projector", "quota"):
                pipeline.start(name)
            port, spare = _free_port(), _free_port()
            stack = Stack(
                pipeline,
                env,
                f"http://127.0.0.1:{port}",
                f"http://127.0.0.1:{spare}",
                tap,
                f"http://127.0.0.1:{fake_port}",
            )
            stack.gateway("gateway", port, "--workers", "4")
            stack.gateway("spare", spare, BILLING_LEASE_TTL_SECONDS=str(LEASE_TTL))
            yield stack
        finally:
            pipeline.stop_all()
            if tap is not None:
                tap.close()


def _four_workers(url: str) -> set[int]:
    deadline = time.monotonic() + 60
    while True:
        pids = set()
        for _ in range(40):
            with httpx.Client(timeout=5) as client:  # a new connection each time
                pids.add(client.get(f"{url}/healthz").json()["pid"])
        if len(pids) == 4:
            return pids
        assert time.monotonic() < deadline, f"only {len(pids)} workers answer"
        time.sleep(0.5)


async def _burst(url: str, key: str, count: int) -> list[httpx.Response]:
    """``count`` requests at once, each on its own connection (spread over the workers)."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(
                    f"{url}/v1/chat/completions",
                    json=CHAT,
                    headers={"Authorization": f"Bearer {key}", **FULL},
                )
                for _ in range(count)
            )
        )


def _wait(predicate: object, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_no_bypass_with_four_gateway_processes(stack: Stack, report: Callable[[str], None]) -> None:
    _four_workers(stack.url)
    key = stack.tenant("0.05")
    before = stack.tap.requests
    answers = asyncio.run(_burst(stack.url, key, 200))
    statuses = [a.status_code for a in answers]
    answered = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 402]
    assert len(answered) + len(refused) == 200, sorted(set(statuses))
    assert answered and refused
    assert stack.tap.requests - before == len(answered)  # no refused request went upstream
    for answer in refused:
        error = answer.json()["error"]
        assert error["type"] == "insufficient_quota" and error["code"] == 402
        assert error["message"]
    ids = [a.headers["x-billing-request-id"] for a in answered]

    async def charged() -> list[asyncpg.Record]:
        return await stack.query(
            "SELECT request_id, amount, tenant_id FROM billing_credit_charges"
            " WHERE request_id = ANY($1::text[])",
            ids,
        )

    _wait(lambda: len(asyncio.run(charged())) == len(ids), "every answer to be charged")
    rows = asyncio.run(charged())
    total = sum((r["amount"] for r in rows), Decimal(0))
    assert total <= Decimal("0.05"), f"{len(ids)} requests billed {total}"
    report(
        f"no bypass, 4 gateway processes: {len(answered)} of 200 answered, {len(refused)}"
        f" refused with 402, billed {total} USD of 0.05"
    )
    assert total > Decimal("0.05") - 2 * Decimal("0.0031")  # the credit was actually used
    tenant_id = rows[0]["tenant_id"]

    async def projected() -> Decimal:
        found = await stack.query(
            "SELECT coalesce(sum(total_cost), 0) AS total FROM billing_transactions"
            " WHERE tenant_id = $1",
            tenant_id,
        )
        return Decimal(found[0]["total"])

    # The read models agree with the ledger: the same requests, the same total.
    _wait(lambda: asyncio.run(projected()) == total, "the projector to agree with the ledger")

    # The official SDK sees its status error with the 402 and the error's type.
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=300
        )
    assert raised.value.status_code == 402
    assert isinstance(raised.value.body, dict)
    assert raised.value.body.get("type") == "insufficient_quota"


def test_a_killed_gateways_lease_expires_and_its_headroom_returns(stack: Stack) -> None:
    key = stack.tenant("0.004")  # room for one request of ≈ $0.0031, not two
    done: list[int] = []

    def slow() -> None:  # holds its reservation while the upstream takes its time
        try:
            answer = httpx.post(
                f"{stack.spare}/v1/chat/completions",
                json=CHAT,
                headers={"Authorization": f"Bearer {key}", "x-fake-latency-ms": "20000", **FULL},
                timeout=30,
            )
            done.append(answer.status_code)
        except httpx.HTTPError:
            done.append(-1)  # the gateway was killed under it

    key_id = _key_id(stack, key)
    thread = threading.Thread(target=slow, daemon=True)
    thread.start()

    async def held() -> Decimal:
        rows = await stack.query(
            "SELECT coalesce(sum(reserved), 0) AS r FROM billing_quota_leases l"
            " JOIN api_keys k ON k.tenant_id = l.tenant_id WHERE k.key_id = $1",
            key_id,
        )
        return Decimal(rows[0]["r"])

    _wait(lambda: asyncio.run(held()) > 0, "the spare gateway's lease to show the reservation")
    stack.pipeline.processes["spare"].send_signal(signal.SIGKILL)
    stack.pipeline.processes["spare"].wait(10)
    thread.join(30)
    assert done == [-1]

    headers = {"Authorization": f"Bearer {key}", **FULL}
    refused = httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT, headers=headers)
    assert refused.status_code == 402  # the dead gateway's lease still holds the headroom
    time.sleep(LEASE_TTL + 0.5)
    admitted = httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT, headers=headers)
    assert admitted.status_code == 200, admitted.text


def test_a_cut_stream_and_a_client_that_leaves_release_their_reservations(stack: Stack) -> None:
    key = stack.tenant("1.00")
    headers = {"Authorization": f"Bearer {key}", **FULL}
    body = CHAT | {"stream": True}
    with httpx.Client(timeout=30) as client:
        cut = client.post(
            f"{stack.url}/v1/chat/completions",
            json=body,
            headers=headers | {"x-fake-cut-after": "5"},
        )
        assert cut.status_code == 200
        with client.stream(
            "POST",
            f"{stack.url}/v1/chat/completions",
            json=body,
            headers=headers | {"x-fake-latency-ms": "50"},
        ) as left:
            assert left.status_code == 200
            next(left.iter_bytes())  # the first chunk, then the client goes
    key_id = _key_id(stack, key)

    async def lease_and_charges() -> tuple[Decimal, Decimal, int]:
        lease = await stack.query(
            "SELECT coalesce(sum(reserved), 0) AS r, coalesce(sum(pending), 0) AS p"
            " FROM billing_quota_leases WHERE tenant_id = (SELECT tenant_id FROM api_keys"
            " WHERE key_id = $1) AND expires_at > now()",
            key_id,
        )
        charges = await stack.query(
            "SELECT count(*) AS n FROM billing_credit_charges WHERE api_key_id = $1", key_id
        )
        return Decimal(lease[0]["r"]), Decimal(lease[0]["p"]), int(charges[0]["n"])

    # Both were billed (estimated from what was seen), charged, and hold nothing any more.
    _wait(lambda: asyncio.run(lease_and_charges()) == (0, 0, 2), "both to settle")


def _key_id(stack: Stack, key: str) -> str:
    """The key id of ``key`` (what the gateway bills it under)."""
    import hashlib

    rows = asyncio.run(
        stack.query(
            "SELECT key_id FROM api_keys WHERE key_hash = $1", hashlib.sha256(key.encode()).digest()
        )
    )
    return str(rows[0]["key_id"])
