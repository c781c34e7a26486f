"""Property-based fuzzing of every HTTP route from the gateway's own OpenAPI document, and
the hostile inputs a first attack run found (issue #14, section 2).

The gateway runs in a real uvicorn server on a free port (a thread of this process) with a
real database, the session broker and the fake upstream (in-process, through the upstream
transport). schemathesis generates requests for every operation of ``/openapi.json`` —
valid ones and invalid ones, seeded (``derandomize``) so a CI run is the same every time —
once with the admin token and once with a tenant key. Every answer is checked:

- never a 5xx (a 502-504 the upstream fake cannot cause does not happen here either);
- its status, content type and body are the ones the document declares (schemathesis'
  conformance checks), every error in its declared shape (``Error`` or ``ProxyError``);
- a refused (4xx) request changed nothing: the database's tenants, keys, prices, credits and
  budgets, and nothing was billed or published;
- every proxied request answered 200 was billed (``proxy.bill`` saw it and billed it), and
  its ``UsageRecorded`` is on the usage topic at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import requests
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.adapters import metrics
from services.adapters.kafka import ensure_topics
from services.adapters.settings import Settings
from services.adapters.topics import Topics
from services.core.events import decode_recorded
from services.gateway import proxy
from services.gateway.app import create_app
from services.gateway.capture import Billed
from services.gateway.server import HeadLimitedProtocol
from services.local.fake_upstream import create_fake_upstream
from tests.integration.pipeline import make_consumer
from tests.integration.test_proxy import Recording, make_key

pytestmark = pytest.mark.integration

ADMIN = "fuzz-admin-token-0123456789"
LIMIT = 64 * 1024
"""``max_body_bytes`` of the fuzzed gateway: small, so the oversized cases stay cheap."""
BODY_SECONDS = 1.0
EXAMPLES = 6
"""Per operation, generation mode and identity: ~28 operations x 2 x 2 x 6 ≈ 700 requests."""
STATE_TABLES = (
    "tenants",
    "api_keys",
    "price_versions",
    "price_aliases",
    "billing_credit_grants",
    "billing_budgets",
    "billing_transactions",
    "tenant_billing_summary",
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Ledger:
    """What the gateway billed, seen through ``proxy.bill``."""

    billed: dict[str, bool] = field(default_factory=dict)
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> int:
        """How many requests were billed."""
        with self.lock:
            return sum(self.billed.values())


@dataclass
class Served:
    url: str
    key: str
    database_url: str
    topics: Topics
    upstream: Recording
    ledger: Ledger
    app: Any


@contextlib.contextmanager
def served_gateway(
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Served]:
    topics = Topics.named(topic_prefix)
    asyncio.run(ensure_topics(kafka_bootstrap, topics.partitions()))
    key = asyncio.run(make_key(database_url))
    upstream = Recording(__import__("httpx").ASGITransport(app=create_fake_upstream()))
    configured = Settings(
        data_dir=tmp_path,
        catalogue_sync=False,
        database_url=database_url,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        openrouter_base_url="http://upstream.test/api/v1",
        vertex_base_url="http://gemini.test/",
        admin_token=ADMIN,
        max_body_bytes=LIMIT,
        body_timeout_seconds=BODY_SECONDS,
        auth_failures_per_minute=1_000_000,  # both identities fail on half the routes
    )
    ledger = Ledger()
    real_bill = proxy.bill

    def bill(*args: Any) -> Billed:
        result = real_bill(*args)
        with ledger.lock:
            ledger.calls += 1
            ledger.billed[args[1].request_id] = result.billed
        return result

    monkeypatch.setattr(proxy, "bill", bill)
    app = create_app(configured, upstream_transport=upstream)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
            http=HeadLimitedProtocol,  # the gateway's own protocol, as `billing gateway` runs
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the gateway did not become ready")
        yield Served(url, key, database_url, topics, upstream, ledger, app)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture
def served(
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Served]:
    with served_gateway(database_url, kafka_bootstrap, topic_prefix, tmp_path, monkeypatch) as s:
        yield s


async def _fingerprint(database_url: str) -> str:
    """A digest of every row a refused request must not touch."""
    connection = await asyncpg.connect(database_url)
    try:
        digest = hashlib.sha256()
        for table in STATE_TABLES:
            rows = await connection.fetchval(
                f"SELECT coalesce(string_agg(t::text, '|' ORDER BY t::text), '') FROM {table} t"  # noqa: S608
            )
            digest.update(f"{table}:{rows};".encode())
        return digest.hexdigest()
    finally:
        await connection.close()


def _unbillable() -> float:
    return sum(
        sample.value
        for family in metrics.UNBILLABLE.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def error_shape(response: Any, case: Any) -> None:
    """A 4xx is JSON in the shape of its route family, with a message."""
    if response.status_code < 400:
        return
    body = json.loads(response.content)
    path = case.operation.path
    if path.startswith(proxy.PROXY_PATHS) and not path.startswith("/v1/usage"):
        error = body["error"]
        assert isinstance(error["message"], str) and isinstance(error["code"], int), body
    else:
        assert isinstance(body["error"], str), body
        assert isinstance(body.get("field", ""), str), body


def _fuzz(
    served: Served, headers: dict[str, str], proxied_ok: list[str], accepted: set[str]
) -> int:
    """Every operation, valid and invalid data; returns the number of requests made."""
    schema = schemathesis.openapi.from_dict(served.app.openapi())
    session = requests.Session()
    made = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Any) -> None:
                nonlocal made
                made += 1
                before = asyncio.run(_fingerprint(served.database_url))
                bills = served.ledger.count()
                case.headers = {**(case.headers or {}), **headers}  # the identity under test
                response = case.call(base_url=served.url, session=session)
                case.validate_response(
                    response,
                    checks=[
                        not_a_server_error,
                        status_code_conformance,
                        content_type_conformance,
                        response_schema_conformance,
                    ],
                )
                error_shape(response, case)
                status = response.status_code
                if 400 <= status < 500:
                    # (an upstream's own 4xx is passed on and billed only with usage: none)
                    assert served.ledger.count() == bills, f"a {status} was billed"
                    after = asyncio.run(_fingerprint(served.database_url))
                    assert after == before, f"a {status} changed the database"
                request_id = (response.headers.get("x-billing-request-id") or [None])[0]
                if status == 200 and request_id:
                    _wait_billed(served.ledger, request_id)
                    proxied_ok.append(request_id)
                if status == 202 and case.operation.path == "/v1/usage":
                    results = response.json()["results"]
                    accepted.update(r["request_id"] for r in results if r["status"] == "accepted")

            try:
                check()
            except Unsatisfiable:
                # Nothing of the operation can be made invalid (GET /healthz): skipped.
                assert mode is GenerationMode.NEGATIVE, operation.label  # noqa: PT017
    return made


def _wait_billed(ledger: Ledger, request_id: str) -> None:
    deadline = time.monotonic() + 5
    while request_id not in ledger.billed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ledger.billed.get(request_id), f"{request_id} was answered 200 and not billed"


async def _on_topic(bootstrap: str, topic: str, wanted: set[str], timeout: float) -> set[str]:
    consumer = make_consumer(bootstrap, topic, group_id=f"{topic}.fuzz-reader")
    await consumer.start()
    seen: set[str] = set()
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not wanted <= seen and asyncio.get_running_loop().time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                seen.update(decode_recorded(record.value).request_id for record in batch)
    finally:
        await consumer.stop()
    return seen


def test_every_route_fuzzed_from_the_openapi_document_answers_as_documented(
    served: Served, kafka_bootstrap: str, report: Callable[[str], None]
) -> None:
    started = time.monotonic()
    unbillable = _unbillable()
    proxied_ok: list[str] = []
    accepted: set[str] = set()
    made = _fuzz(served, {"Authorization": f"Bearer {ADMIN}"}, proxied_ok, accepted)
    made += _fuzz(served, {"Authorization": f"Bearer {served.key}"}, proxied_ok, accepted)
    assert proxied_ok, "no proxied request was answered 200: the fuzzing reached no upstream"
    wanted = set(proxied_ok) | accepted
    seen = asyncio.run(_on_topic(kafka_bootstrap, served.topics.usage, wanted, 20))
    assert set(proxied_ok) <= seen, f"answered but never billed: {set(proxied_ok) - seen}"
    # Nothing else reached the log: every event is a request answered 2xx (or an upstream
    # error that carried usage, billed by proxy.bill).
    billed = {request_id for request_id, done in served.ledger.billed.items() if done}
    assert seen <= billed | accepted, f"published without a 2xx: {seen - billed - accepted}"
    assert _unbillable() == unbillable, "a request was answered but could not be billed"
    elapsed = time.monotonic() - started
    report(f"http fuzz: {made} requests, {len(proxied_ok)} proxied 200s, {elapsed:.1f} s")


# -- the attack run's findings, one by one -------------------------------------------------------

CHAT = "/v1/chat/completions"
GEMINI = "/v1beta/models/gemini-2.5-flash:generateContent"


def _post(served: Served, path: str, body: bytes | str, key: str | None = None) -> Any:
    """POST raw bytes (a JSON text written by hand: lone surrogates, huge numbers)."""
    headers = {"Authorization": f"Bearer {key or ADMIN}", "Content-Type": "application/json"}
    data = body.encode() if isinstance(body, str) else body
    return requests.post(served.url + path, data=data, headers=headers, timeout=30)


def _refused(response: Any, status: int, sdk: bool = False) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = json.loads(response.content.decode("utf-8"))  # valid UTF-8 JSON
    if sdk:
        assert body["error"]["code"] == status and isinstance(body["error"]["message"], str)
    else:
        assert isinstance(body["error"], str), body
    return body


def test_hostile_json_is_refused_in_the_documented_shape_and_never_forwarded(
    served: Served,
) -> None:
    deep = "[" * 10_000 + "]" * 10_000
    not_utf8 = b'{"model": "\xff\xfe"}'
    for path in (CHAT, GEMINI):
        for body in (deep, not_utf8, "{" + '"a":' * 5000 + "1" + "}" * 5000):
            _refused(_post(served, path, body, served.key), 400, sdk=True)
    for path in ("/v1/usage", "/internal/billing/quote", "/internal/billing/prices"):
        for body in (deep, not_utf8):
            _refused(_post(served, path, body), 400 if body is deep else 400)
    # A model the usage event cannot carry is refused before anything is sent: it could
    # never be billed.
    messages = '"messages": [{"role": "user", "content": "hi"}]'
    for model in ('"\\ud800"', '"gpt\\u0000x"', json.dumps("m" * 300)):
        _refused(_post(served, CHAT, f'{{"model": {model}, {messages}}}', served.key), 400, True)
    long_gemini = f"/v1beta/models/{'g' * 260}:generateContent"
    _refused(_post(served, long_gemini, '{"contents": []}', served.key), 400, sdk=True)
    assert served.upstream.requests == []
    assert served.ledger.calls == 0
    # A Gemini part that is a bare string: the fake answers as Google does (400), passed on.
    bare = '{"contents": [{"role": "user", "parts": ["hello"]}]}'
    _refused(_post(served, GEMINI, bare, served.key), 400, sdk=True)


def test_huge_numbers_surrogates_and_nul_are_422s_naming_the_field(served: Served) -> None:
    huge = "9" * 400
    item = (
        '{"request_id": "%s", "tenant_id": "acme", "provider": "openai", '
        '"provider_model_id": "openai/gpt-4o-mini", "usage": {"prompt_tokens": %s}}'
    )
    body = _refused(_post(served, "/v1/usage", item % ("huge", huge)), 422)
    assert body["results"][0]["field"] == "usage.prompt_tokens"
    # In a batch, the one item is refused and the valid one goes through.
    batch = _post(served, "/v1/usage", f"[{item % ('huge', huge)}, {item % ('fine', '12')}]")
    assert batch.status_code == 202, batch.text
    assert [r["status"] for r in batch.json()["results"]] == ["rejected", "accepted"]
    quote = '{"provider_model_id": "openai/gpt-4o-mini", "usage": {"prompt_tokens": %s}}'
    assert _refused(_post(served, "/internal/billing/quote", quote % huge), 422)["field"]
    # A lone surrogate echoed in an error message: still valid UTF-8 JSON.
    surrogate = item.replace('"openai/gpt-4o-mini"', '"\\ud800"') % ("s", "1")
    _refused(_post(served, "/v1/usage", surrogate), 422)
    _refused(_post(served, "/internal/billing/quote", '{"provider_model_id": "\\ud800x"}'), 404)
    correction = (
        '{"model": "openai/gpt-4o-mini", "effective_from": "2025-01-01T00:00:00Z", '
        '"prompt": "0.000001", "by": "fuzz", "reason": "%s"}'
    )
    for reason in ("a\\u0000b", "a\\udc00b"):
        assert _refused(_post(served, "/internal/billing/prices", correction % reason), 422)[
            "field"
        ] == ("reason")


def _raw(served: Served) -> socket.socket:
    host, port = served.url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=10)
    return connection


def _head(path: str, extra: str, key: str = ADMIN) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


def _answer(connection: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


def test_bodies_over_the_limit_are_refused_without_being_read(served: Served) -> None:
    # Declared too large: 413 at once, before a byte of the body.
    with _raw(served) as connection:
        connection.sendall(_head("/v1/usage", f"Content-Length: {LIMIT * 1000}\r\n"))
        status, data = _answer(connection)
    assert status == 413 and b"connection: close" in data.lower()
    # Chunked (no length): read up to the limit, then refused; the client stops once answered.
    sent = 0
    with _raw(served) as connection:
        connection.sendall(_head(CHAT, "Transfer-Encoding: chunked\r\n", served.key))
        chunk = b"a" * 4096
        connection.setblocking(False)
        answered = False
        while sent < LIMIT * 100 and not answered:
            try:
                connection.sendall(b"1000\r\n" + chunk + b"\r\n")
                sent += len(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                pass
            try:
                answered = bool(connection.recv(1, socket.MSG_PEEK))
            except BlockingIOError:
                time.sleep(0.001)
        connection.setblocking(True)
        status, _ = _answer(connection)
    assert status == 413
    assert sent < 4 * LIMIT, f"{sent} bytes pulled before the 413"


def test_a_stalled_upload_is_answered_408_within_the_body_timeout(served: Served) -> None:
    for path, head, key in (
        ("/internal/billing/quote", "Content-Length: 1000\r\n", ADMIN),
        (CHAT, "Transfer-Encoding: chunked\r\n", served.key),
    ):
        with _raw(served) as connection:
            started = time.monotonic()
            connection.sendall(_head(path, head, key) + b'5\r\n{"a":\r\n')
            assert requests.get(served.url + "/healthz", timeout=5).status_code == 200
            status, _ = _answer(connection)
            waited = time.monotonic() - started
        assert status == 408, path
        assert BODY_SECONDS * 0.9 <= waited < BODY_SECONDS + 2, waited
