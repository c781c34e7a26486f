"""Safe to expose, against the real database and the session broker: secrets never reach
logs, metrics, answers or events; the gateway's database calls are bounded; the transport
settings reach aiokafka (and the embedded broker is still reached in plain text)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi.testclient import TestClient

from services.adapters.database import connect, create_pool, init_connection
from services.adapters.errors import DatabaseError
from services.adapters.kafka import ensure_topics, make_producer
from services.adapters.settings import Settings
from services.adapters.tenants import create_key, create_tenant, revoke_key
from services.adapters.topics import Topics
from services.gateway.app import create_app
from services.local.fake_upstream import create_fake_upstream
from tests.integration.test_ingest import read_all

pytestmark = pytest.mark.integration

ADMIN = "adm1n-SECRET-9f3c2a"
FINANCE = "f1n-SECRET-77d0e1"
UPSTREAM = "sk-or-SECRET-upstream-4b1e"
VERTEX = "AIza-SECRET-vertex-0c9d"
KAFKA_PASSWORD = "kafka-SECRET-pw-31aa"
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello " * 20}]}
GEMINI = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}


async def _keys(database_url: str) -> tuple[str, str, str]:
    """(a live key, a revoked key, the revoked key's id) of tenant ``acme``."""
    connection = await asyncpg.connect(database_url)
    await init_connection(connection)
    try:
        await create_tenant(connection, "acme")
        live = (await create_key(connection, "acme", "live"))[1]
        revoked_id, revoked = await create_key(connection, "acme", "revoked")
        return live, revoked, revoked_id
    finally:
        await connection.close()


async def _revoke(database_url: str, key_id: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await revoke_key(connection, key_id)
    finally:
        await connection.close()


def test_secrets_never_reach_logs_metrics_answers_or_events(
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # the root: every logger, httpx's and uvicorn's included
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore", "aiokafka"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    topics = Topics.named(topic_prefix)
    asyncio.run(ensure_topics(kafka_bootstrap, topics.partitions()))
    live, revoked, revoked_id = asyncio.run(_keys(database_url))
    secrets = [ADMIN, FINANCE, UPSTREAM, VERTEX, live, revoked]
    settings = Settings(
        data_dir=tmp_path,
        catalogue_sync=False,
        database_url=database_url,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        admin_token=ADMIN,
        finance_token=FINANCE,
        openrouter_base_url="http://upstream.test/api/v1",
        openrouter_api_key=UPSTREAM,
        vertex_base_url="http://vertex.test",
        vertex_api_key=VERTEX,
    )
    seen_upstream: list[httpx.Request] = []

    class Recording(httpx.AsyncBaseTransport):
        inner = httpx.ASGITransport(app=create_fake_upstream())

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            seen_upstream.append(request)
            return await self.inner.handle_async_request(request)

    answers: list[httpx.Response] = []
    with TestClient(create_app(settings, upstream_transport=Recording())) as client:
        client.app.state.resources.key_cache.ttl = 0.2  # type: ignore[attr-defined]
        for _ in range(200):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        tenant = {"Authorization": f"Bearer {live}"}

        def chat(headers: dict[str, str], **kw: object) -> None:
            answers.append(client.post("/v1/chat/completions", headers=headers, **kw))  # type: ignore[arg-type]

        chat(tenant, json=CHAT)
        chat(tenant, json={**CHAT, "stream": True})
        chat(tenant | {"x-fake-status": "500"}, json=CHAT)  # the upstream fails
        chat(tenant, content=b"{not json")  # malformed bodies
        chat(tenant, json=[1, 2])
        chat(tenant, json={"messages": []})
        chat({"Authorization": f"Bearer {live}x"}, json=CHAT)  # a wrong key
        chat({"Authorization": f"Bearer {revoked}"}, json=CHAT)  # valid, then revoked
        asyncio.run(_revoke(database_url, revoked_id))
        time.sleep(0.3)
        chat({"Authorization": f"Bearer {revoked}"}, json=CHAT)
        gemini = "/v1beta/models/gemini-2.5-flash:generateContent"
        answers.append(client.post(gemini, headers={"x-goog-api-key": live}, json=GEMINI))
        answers.append(client.post(f"{gemini}?key={live}", json=GEMINI))  # never accepted
        answers.append(client.post(gemini, headers={"x-goog-api-key": live}, content=b"]"))
        admin, finance = (
            {"Authorization": f"Bearer {ADMIN}"},
            {"Authorization": f"Bearer {FINANCE}"},
        )
        answers.append(client.get("/internal/billing/summary", headers=admin))
        answers.append(client.get("/internal/billing/summary", headers=finance))
        answers.append(client.post("/internal/billing/credits", headers=finance, json={}))
        answers.append(
            client.get("/internal/billing/summary", headers={"Authorization": f"Bearer {ADMIN}z"})
        )
        answers.append(client.post("/v1/usage", headers=admin, content=b"{bad"))
        answers.append(
            client.get("/v1/billing/summary", headers={"Authorization": f"Bearer {revoked}"})
        )
        answers.append(client.post("/dashboard/sign-in", data={"credential": live, "csrf": "x"}))
        metrics = client.get("/metrics").text
    events = asyncio.run(read_all(kafka_bootstrap, topics.usage, 3, timeout=5))

    statuses = [a.status_code for a in answers]
    assert statuses[:9] == [200, 200, 500, 400, 400, 400, 401, 200, 401], statuses
    assert statuses[9] == 200 and statuses[10] == 401 and statuses[11] == 400
    assert statuses[12] in (200, 422) and statuses[13] in (200, 422)  # past authentication
    assert statuses[14:17] == [403, 401, 400] and statuses[17] == 401
    assert events, "the answered requests were billed"
    # The gateway's own upstream credentials went upstream, in headers, never in URLs.
    assert any(r.headers.get("authorization") == f"Bearer {UPSTREAM}" for r in seen_upstream)
    assert any(r.headers.get("x-goog-api-key") == VERTEX for r in seen_upstream)
    assert all(live not in str(r.url) and live not in str(r.headers) for r in seen_upstream)

    # The test's own client logs the URLs it requests (one carries ?key=): not the gateway's.
    gateway_records = [r for r in caplog.records if "http://testserver" not in r.getMessage()]
    handler = logging.Handler()
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    logged = "\n".join(
        f"{handler.format(r)} {r.exc_text or ''} {r.args!r}" for r in gateway_records
    )
    assert caplog.records, "nothing was logged: the capture is not working"
    assert "http://upstream.test/api/v1/chat/completions" in logged  # httpx's INFO lines
    assert "http://vertex.test/v1beta/models/" in logged
    produced = b"".join(events)
    for secret in secrets:
        assert secret not in logged, f"a secret ({secret[:6]}...) was logged"
        assert secret not in metrics, f"a secret ({secret[:6]}...) is in /metrics"
        assert secret.encode() not in produced, f"a secret ({secret[:6]}...) is in an event"
        for answer in answers:
            assert secret.encode() not in answer.content, (answer.request.url.path, secret[:6])
            assert secret not in str(answer.headers)


def test_only_the_gateway_pool_bounds_statements_and_waits(database_url: str) -> None:
    async def check() -> None:
        gateway = await create_pool(database_url, max_size=1, timeout=0.5)
        long_jobs = await create_pool(database_url, max_size=1)
        try:
            assert await gateway.fetchval("SHOW statement_timeout") == "500ms"
            assert await long_jobs.fetchval("SHOW statement_timeout") == "0"
            # The server's statement_timeout and the client's command_timeout race.
            with pytest.raises((asyncpg.QueryCanceledError, TimeoutError)):
                await gateway.fetchval("SELECT pg_sleep(3)")
            async with gateway.acquire():
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    async with gateway.acquire():
                        pass
                assert time.monotonic() - started < 2.5
            await long_jobs.execute("SELECT pg_sleep(0.7)")  # past 500 ms: not bounded
        finally:
            await gateway.close()
            await long_jobs.close()

    asyncio.run(check())


def test_the_gateway_opens_its_pool_with_the_configured_timeout(
    database_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        catalogue_sync=False,
        database_url=database_url,
        database_timeout_seconds=2.5,
    )
    with TestClient(create_app(settings)) as client:
        pool = client.app.state.resources.pool  # type: ignore[attr-defined]

        async def timeout() -> str:
            return str(await pool.fetchval("SHOW statement_timeout"))

        assert client.portal.call(timeout) == "2500ms"  # type: ignore[union-attr]


def test_database_tls_settings_reach_asyncpg(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def ssl_in_use() -> bool:
        connection = await connect(database_url)
        try:
            return bool(
                await connection.fetchval(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                )
            )
        finally:
            await connection.close()

    monkeypatch.setenv("BILLING_DATABASE_SSLMODE", "disable")
    assert asyncio.run(ssl_in_use()) is False
    monkeypatch.setenv("BILLING_DATABASE_SSLMODE", "require")
    try:
        encrypted = asyncio.run(ssl_in_use())
    except (DatabaseError, ConnectionError) as exc:  # a test server without TLS refuses
        assert "SSL" in str(exc) or "ssl" in str(exc)
    else:
        assert encrypted  # a server with TLS: the connection is encrypted


def test_kafka_sasl_settings_reach_the_broker_and_plaintext_still_connects(
    kafka_bootstrap: str,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from aiokafka.errors import KafkaError

    caplog.set_level(logging.DEBUG)
    topics = Topics.named(topic_prefix)

    async def produce() -> None:
        producer = make_producer(kafka_bootstrap)
        try:
            await producer.start()
            await producer.send_and_wait(topics.usage, b"plaintext", key=b"t")
        finally:
            await producer.stop()

    asyncio.run(ensure_topics(kafka_bootstrap, topics.partitions()))
    asyncio.run(produce())  # PLAINTEXT (the default) reaches the embedded broker
    assert asyncio.run(read_all(kafka_bootstrap, topics.usage, 1)) == [b"plaintext"]

    monkeypatch.setenv("BILLING_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("BILLING_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("BILLING_KAFKA_SASL_USERNAME", "billing")
    monkeypatch.setenv("BILLING_KAFKA_SASL_PASSWORD", KAFKA_PASSWORD)
    with pytest.raises(KafkaError):
        asyncio.run(produce())  # Tansu does no SASL: the handshake the client tried fails
    assert "UnsupportedSaslMechanism" in caplog.text
    assert KAFKA_PASSWORD not in caplog.text
