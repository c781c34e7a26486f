"""The official ``openai`` SDK against real processes, checked in PostgreSQL.

One stack per module: ``billing fake-upstream``, ``billing gateway`` in front of it, and the
pricer and projector, on the session's broker with a topic prefix and a database of the
module's own. Tenants and keys are made with the CLI, like an operator would. Between the
gateway and the fake upstream sits a :class:`Tap`, a TCP relay that counts the requests
reaching the upstream and notes when its bytes pass: it shows that a refused request never
left the gateway and that a stream reached the client before the upstream had finished.

Every check ends in ``billing_transactions`` and ``tenant_billing_summary``. "Nothing was
billed" is shown with a barrier: a later request of the same tenant (same partition, so
ordered behind anything the first one could have emitted) is projected, and the first is
still absent.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from openai import OpenAI

from services.adapters.kafka import ensure_topics
from services.adapters.readmodels import COST_COLUMNS, COUNT_COLUMNS
from services.gateway.keys import KeyCache
from tests.conftest import migrated_database
from tests.e2e.test_cli import BILLING, _free_port
from tests.integration.pipeline import Pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MODEL = "openai/gpt-4o-mini"
MESSAGES: list[Any] = [{"role": "user", "content": "Say something about billing. " * 8}]
STARTUP_SECONDS = 60.0
PROJECTED_SECONDS = 90.0
UNSAFE_ENV = (
    "OPENROUTER_API_KEY",
    "BILLING_ADMIN_TOKEN",
    "BILLING_ENV",
    "VERTEX_API_KEY",
    "VERTEX_BASE_URL",
)


class Tap:
    """A loopback TCP relay to ``target_port`` that counts HTTP requests passing upstream and
    notes (``perf_counter``) when the last byte came back."""

    REQUEST_LINE_END = b" HTTP/1.1\r\n"

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.requests = 0
        self.last_from_upstream = 0.0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="tap-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                downstream.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((downstream, upstream))
            for src, dst, up in ((downstream, upstream, True), (upstream, downstream, False)):
                threading.Thread(target=self._pump, args=(src, dst, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        keep = len(self.REQUEST_LINE_END) - 1  # a request line split across two reads
        tail = b""
        try:
            while data := src.recv(65536):
                if up:
                    seen = tail + data
                    with self._lock:
                        self.requests += seen.count(self.REQUEST_LINE_END)
                    tail = seen[-keep:]
                else:
                    self.last_from_upstream = time.perf_counter()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src, dst)

    def _drop(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the other pump's recv
            except OSError:
                pass
            sock.close()
            with self._lock:
                self._sockets.discard(sock)

    def close(self) -> None:
        self._drop(self._listener)  # shutdown wakes the accepting thread (close alone may not)
        with self._lock:
            held = list(self._sockets)
        self._drop(*held)


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    key_id: str
    key: str


@dataclass
class Stack:
    pipeline: Pipeline
    gateway: str
    """``http://127.0.0.1:PORT``"""
    tap: Tap
    env: dict[str, str]

    @property
    def database_url(self) -> str:
        return self.pipeline.database_url

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BILLING, *args], env=self.env, capture_output=True, text=True, timeout=60
        )

    def tenant(self, name: str) -> Tenant:
        """A new tenant (``name`` plus a unique suffix) and one key, made with the CLI."""
        tenant_id = f"{name}-{uuid.uuid4().hex[:6]}"
        made = self.cli("tenants", "create", tenant_id)
        assert made.returncode == 0, made.stderr
        created = self.cli("keys", "create", "--tenant", tenant_id, "--name", "sdk")
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        found = re.search(r"key id (\S+) for tenant", created.stderr)
        assert found, created.stderr
        assert key.startswith(f"bk_{found[1]}_")
        return Tenant(tenant_id, found[1], key)

    def openai(self, key: str) -> OpenAI:
        # No retries: every upstream call the test causes is one it asked for.
        return OpenAI(api_key=key, base_url=f"{self.gateway}/v1", max_retries=0, timeout=60)

    def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async def run() -> list[asyncpg.Record]:
            connection = await asyncpg.connect(self.database_url)
            try:
                return list(await connection.fetch(sql, *args))
            finally:
                await connection.close()

        return asyncio.run(run())

    def rows(self, *request_ids: str) -> dict[str, asyncpg.Record]:
        found = self.fetch(
            "SELECT * FROM billing_transactions WHERE request_id = ANY($1::text[])",
            list(request_ids),
        )
        return {r["request_id"]: r for r in found}

    def wait_for(self, *request_ids: str, timeout: float = PROJECTED_SECONDS) -> dict[str, Any]:
        """The transactions of ``request_ids`` once all are projected (bounded poll)."""
        deadline = time.monotonic() + timeout
        while len(found := self.rows(*request_ids)) < len(request_ids):
            if time.monotonic() > deadline:
                missing = sorted(set(request_ids) - set(found))
                pytest.fail(f"not projected in {timeout}s: {missing}\n{self.logs()}")
            time.sleep(0.2)
        return found

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}\n{self.pipeline.log(name)}"
            for name in ("fake-upstream", "gateway", "pricer", "projector")
        )

    def summary_equals_transactions(self, tenant_id: str) -> tuple[dict[str, Any], int]:
        """(the tenant's summary totals, its transaction count), asserting the summary equals
        the sum of its transactions (both read in one snapshot)."""
        columns = (*COUNT_COLUMNS, *COST_COLUMNS)
        sums = ", ".join(f"coalesce(sum({c}), 0) AS {c}" for c in columns)
        [row] = self.fetch(
            f"WITH t AS (SELECT count(*) AS n, {sums} FROM billing_transactions"  # noqa: S608
            f" WHERE tenant_id = $1), s AS (SELECT {sums} FROM tenant_billing_summary"
            " WHERE tenant_id = $1) SELECT row_to_json(t)::text AS t, row_to_json(s)::text AS s"
            " FROM t, s",
            tenant_id,
        )
        transactions = json.loads(row["t"], parse_float=Decimal)
        count = transactions.pop("n")
        summary = json.loads(row["s"], parse_float=Decimal)
        assert summary == transactions
        return summary, count


def _spawn(pipeline: Pipeline, name: str, args: list[str], env: dict[str, str]) -> None:
    """Start ``billing ARGS`` logging to the workdir; ``pipeline.stop_all`` stops it."""
    with (pipeline.workdir / f"{name}.log").open("ab") as log:
        pipeline.processes[name] = subprocess.Popen(
            [BILLING, *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )


def _wait_until_ok(url: str, pipeline: Pipeline, name: str) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        process = pipeline.processes[name]
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{name} not ready at {url} (exit {process.poll()})\n{pipeline.log(name)}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(
    postgres_server: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("openai-sdk")
    prefix = f"t{uuid.uuid4().hex[:10]}."
    with migrated_database(postgres_server, "sdk") as database_url:
        pipeline = Pipeline(kafka_bootstrap, database_url, prefix, workdir)
        tap: Tap | None = None
        try:
            asyncio.run(ensure_topics(kafka_bootstrap, pipeline.topics.partitions()))
            env = {k: v for k, v in pipeline.env().items() if k not in UNSAFE_ENV}
            fake_port = _free_port()
            _spawn(pipeline, "fake-upstream", ["fake-upstream", "--port", str(fake_port)], env)
            _wait_until_ok(f"http://127.0.0.1:{fake_port}/openapi.json", pipeline, "fake-upstream")
            tap = Tap(fake_port)
            gateway_port = _free_port()
            gateway_env = env | {
                "OPENROUTER_BASE_URL": f"http://127.0.0.1:{tap.port}/api/v1",
                "BILLING_SPOOL_DIR": str(workdir / "spool"),
            }
            _spawn(pipeline, "gateway", ["gateway", "--port", str(gateway_port)], gateway_env)
            pipeline.start("pricer")
            pipeline.start("projector")
            gateway = f"http://127.0.0.1:{gateway_port}"
            _wait_until_ok(f"{gateway}/readyz", pipeline, "gateway")  # broker connected too
            yield Stack(pipeline, gateway, tap, env)
        finally:
            pipeline.stop_all()
            if tap is not None:
                tap.close()


def _reported_cost(usage: Any) -> Decimal:
    """``usage.cost`` as the SDK kept it (an unknown field, parsed as a JSON number)."""
    extra = usage.model_extra or {}
    assert "cost" in extra, f"the SDK dropped OpenRouter's cost: {usage}"
    return Decimal(str(extra["cost"]))


def _assert_billed_as(row: Any, usage: Any, tenant: Tenant) -> None:
    """One transaction against the usage the SDK returned for its request."""
    assert (row["tenant_id"], row["api_key_id"]) == (tenant.tenant_id, tenant.key_id)
    assert row["usage_source"] == "upstream"
    assert row["provider_model_id"] == MODEL
    assert row["prompt_tokens"] == usage.prompt_tokens
    assert row["completion_tokens"] == usage.completion_tokens
    assert row["reasoning_tokens"] == usage.completion_tokens_details.reasoning_tokens
    assert row["cache_read_tokens"] == usage.prompt_tokens_details.cached_tokens
    cost = _reported_cost(usage)
    assert row["reported_cost"] == cost
    assert row["total_cost"] == cost  # the fake charges the project's own prices: no drift


def test_json_and_streamed_completions_are_billed_as_the_sdk_saw_them(stack: Stack) -> None:
    tenant = stack.tenant("sdk-billed")
    knobs = {"x-fake-reasoning-tokens": "7", "x-fake-cached-tokens": "16"}
    with stack.openai(tenant.key) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, extra_headers=knobs
        )
        completion = raw.parse()
        with client.chat.completions.with_streaming_response.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=knobs,
        ) as response:
            streamed_id = response.headers["x-billing-request-id"]
            chunks = list(response.parse())
    plain_id = raw.headers["x-billing-request-id"]
    assert plain_id != streamed_id
    for name in ("date", "server"):  # the gateway's own, not the upstream's beside them
        assert len(raw.headers.get_list(name)) <= 1, raw.headers
    assert completion.choices[0].message.content
    assert completion.usage is not None
    # The cost exactly as the upstream wrote it (the SDK holds it as a float).
    exact = json.loads(raw.text, parse_float=Decimal)["usage"]["cost"]
    assert _reported_cost(completion.usage) == exact > 0
    usages = [c.usage for c in chunks if c.usage is not None]
    assert len(usages) == 1 and chunks[-1].usage is usages[0]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    for usage in (completion.usage, usages[0]):  # the knobs' headers got through
        assert usage.completion_tokens_details and usage.prompt_tokens_details
        assert usage.completion_tokens_details.reasoning_tokens == 7
        assert usage.prompt_tokens_details.cached_tokens == 16

    rows = stack.wait_for(plain_id, streamed_id)

    _assert_billed_as(rows[plain_id], completion.usage, tenant)
    _assert_billed_as(rows[streamed_id], usages[0], tenant)
    summary, count = stack.summary_equals_transactions(tenant.tenant_id)
    assert count == 2
    assert summary["total_cost"] == rows[plain_id]["total_cost"] + rows[streamed_id]["total_cost"]


def test_a_stream_reaches_the_client_before_the_upstream_has_finished(
    stack: Stack, report: Callable[[str], None]
) -> None:
    # The fake upstream has no per-chunk delay knob (x-fake-latency-ms delays only the first
    # byte), so a long answer stands in for a slow one: the upstream takes a while to write
    # it all, and the first chunk must reach the client meanwhile. The SSE lines are timed
    # as they arrive, unparsed: the SDK's parsing (the slowest part here) is not measured.
    tokens = 50_000
    tenant = stack.tenant("sdk-relay")
    with stack.openai(tenant.key) as client:
        started = time.perf_counter()
        with client.chat.completions.with_streaming_response.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-fake-completion-tokens": str(tokens)},
        ) as response:
            request_id = response.headers["x-billing-request-id"]
            arrivals = [(time.perf_counter(), line) for line in response.iter_lines() if line]
    upstream_done = stack.tap.last_from_upstream
    assert len(arrivals) == tokens + 2  # a chunk per token, the usage chunk, [DONE]
    assert arrivals[-1][1] == "data: [DONE]"
    final = json.loads(arrivals[-2][1].removeprefix("data: "))
    assert final["usage"]["completion_tokens"] == tokens
    first, last = arrivals[0][0] - started, arrivals[-1][0] - started
    report(
        f"a stream of {tokens} chunks through the gateway: first chunk at {first * 1000:.0f} ms,"
        f" last at {last * 1000:.0f} ms; the upstream's last byte at"
        f" {(upstream_done - started) * 1000:.0f} ms"
    )
    assert arrivals[0][0] < upstream_done, "the first chunk waited for the whole answer"
    assert first < last / 4
    assert stack.wait_for(request_id)[request_id]["completion_tokens"] == tokens


def test_a_wrong_key_is_refused_before_the_upstream_and_bills_nothing(stack: Stack) -> None:
    tenant = stack.tenant("sdk-wrong")
    calls = stack.tap.requests
    count_before = stack.fetch("SELECT count(*) AS n FROM billing_transactions")[0]["n"]
    wrong_keys = (
        "sk-not-a-billing-key",
        "bk_000000000000_unknown",
        tenant.key[:-1] + ("A" if tenant.key[-1] != "A" else "B"),  # one character off
    )
    for wrong in wrong_keys:
        with stack.openai(wrong) as client, pytest.raises(openai.AuthenticationError) as refused:
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert refused.value.status_code == 401
        assert "x-billing-request-id" not in refused.value.response.headers
    assert stack.tap.requests == calls, "a refused request reached the upstream"

    with stack.openai(tenant.key) as client:
        barrier = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    barrier_id = barrier.headers["x-billing-request-id"]
    assert stack.tap.requests == calls + 1
    stack.wait_for(barrier_id)
    count_after = stack.fetch("SELECT count(*) AS n FROM billing_transactions")[0]["n"]
    assert count_after == count_before + 1


def test_a_revoked_key_is_refused_within_the_key_cache_ttl(stack: Stack) -> None:
    tenant = stack.tenant("sdk-revoked")
    auth = {"Authorization": f"Bearer {tenant.key}"}
    with stack.openai(tenant.key) as client:
        valid = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
        valid_id = valid.headers["x-billing-request-id"]  # the key is now cached as valid
        revoked = stack.cli("keys", "revoke", tenant.key_id)
        assert revoked.returncode == 0, revoked.stderr
        since = time.monotonic()
        ttl = KeyCache().ttl
        # Poll a cheap route behind the same key cache, not the upstream.
        while httpx.get(f"{stack.gateway}/v1/billing/summary", headers=auth).status_code != 401:
            assert time.monotonic() - since < ttl + 5, "the revoked key still works"
            time.sleep(0.2)
        calls = stack.tap.requests
        with pytest.raises(openai.AuthenticationError) as refused:
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert refused.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert stack.tap.requests == calls
    assert list(stack.wait_for(valid_id)) == [valid_id]
    _, count = stack.summary_equals_transactions(tenant.tenant_id)
    assert count == 1  # the request made before the revocation, nothing after


def test_a_tenant_key_reads_its_own_tenant_only(stack: Stack) -> None:
    a, b = stack.tenant("sdk-iso-a"), stack.tenant("sdk-iso-b")
    own: dict[str, str] = {}
    for tenant in (a, b):
        with stack.openai(tenant.key) as client:
            raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
        own[tenant.tenant_id] = raw.headers["x-billing-request-id"]
    rows = stack.wait_for(*own.values())

    for me, other in ((a, b), (b, a)):
        auth = {"Authorization": f"Bearer {me.key}"}
        mine = rows[own[me.tenant_id]]
        for params in ({}, {"tenant_id": other.tenant_id}):  # a query cannot pick the tenant
            listing = httpx.get(
                f"{stack.gateway}/v1/billing/transactions", headers=auth, params=params
            )
            assert listing.status_code == 200, listing.text
            transactions = listing.json()["transactions"]
            assert [t["request_id"] for t in transactions] == [own[me.tenant_id]]
            assert {t["tenant_id"] for t in transactions} == {me.tenant_id}
            assert Decimal(transactions[0]["total_cost"]) == mine["total_cost"]
            summary = httpx.get(f"{stack.gateway}/v1/billing/summary", headers=auth, params=params)
            assert summary.status_code == 200, summary.text
            assert summary.json()["tenant_id"] == me.tenant_id
            assert Decimal(summary.json()["totals"]["total_cost"]) == mine["total_cost"]
        theirs = httpx.get(
            f"{stack.gateway}/v1/billing/transactions",
            headers=auth,
            params={"api_key_id": other.key_id},
        )
        assert theirs.status_code == 200 and theirs.json()["transactions"] == []
        stack.summary_equals_transactions(me.tenant_id)


def test_a_client_gone_mid_stream_is_billed_an_estimate(
    stack: Stack, report: Callable[[str], None]
) -> None:
    # Far more than the socket buffers between upstream and client hold, so the gateway
    # cannot have read the upstream's final usage chunk when the client goes away.
    planned = 200_000
    tenant = stack.tenant("sdk-gone")
    with stack.openai(tenant.key) as client:
        with client.chat.completions.with_streaming_response.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-fake-completion-tokens": str(planned)},
        ) as response:
            request_id = response.headers["x-billing-request-id"]
            received = list(itertools.islice(response.parse(), 5))
        # leaving the block closes the connection with the answer unread
    assert len(received) == 5 and all(c.usage is None for c in received)

    row = stack.wait_for(request_id)[request_id]

    assert row["usage_source"] == "estimated"
    assert (row["tenant_id"], row["api_key_id"]) == (tenant.tenant_id, tenant.key_id)
    assert 0 < row["completion_tokens"] <= planned
    assert row["prompt_tokens"] > 0
    assert row["reported_cost"] is None and row["total_cost"] > 0
    report(
        f"client gone after 5 of {planned} chunks: billed an estimate of"
        f" {row['completion_tokens']} completion tokens"
    )
    stack.summary_equals_transactions(tenant.tenant_id)


def test_an_upstream_500_reaches_the_sdk_and_bills_nothing(stack: Stack) -> None:
    tenant = stack.tenant("sdk-500")
    failed_ids = []
    with stack.openai(tenant.key) as client:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as failed:
                client.chat.completions.create(
                    model=MODEL,
                    messages=MESSAGES,
                    stream=stream,
                    extra_headers={"x-fake-status": "500"},
                )
            assert failed.value.status_code == 500
            failed_ids.append(failed.value.response.headers["x-billing-request-id"])
        barrier = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    barrier_id = barrier.headers["x-billing-request-id"]

    stack.wait_for(barrier_id)  # same tenant, same partition: behind anything the 500s sent

    assert stack.rows(*failed_ids) == {}
    listed = stack.fetch(
        "SELECT request_id FROM billing_transactions WHERE tenant_id = $1", tenant.tenant_id
    )
    assert [r["request_id"] for r in listed] == [barrier_id]
    _, count = stack.summary_equals_transactions(tenant.tenant_id)
    assert count == 1
