"""Safe to expose: the key cache under a flood, failed-authentication limits, the finance
token's reach and the gateway's refusal to listen openly without an admin token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from services.adapters.settings import Settings
from services.adapters.tenants import key_hash
from services.cli.main import main
from services.cli.stack import is_loopback
from services.gateway import keys
from services.gateway.app import create_app
from services.gateway.auth import finance_may
from services.gateway.keys import FailureLimiter, KeyCache, TenantKey

ADMIN = "adm1n-t0ken-for-tests"
FINANCE = "f1nance-t0ken-for-tests"
VALID = "bk_valid_key_for_tests"


class Clock:
    """``time.monotonic`` for ``services.gateway.keys``, moved by hand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(keys.time, "monotonic", lambda: self.now)


# -- the key cache -------------------------------------------------------------------------------


def test_a_flood_of_unknown_keys_never_evicts_the_valid_ones() -> None:
    cache = KeyCache(ttl=60, max_entries=100, max_refused=50)
    valid = {key_hash(f"bk_valid_{n}"): TenantKey("t", f"k{n}") for n in range(100)}
    for digest, value in valid.items():
        cache.put(digest, value)
    for n in range(10_000):
        cache.put(key_hash(f"bk_flood_{n}"), None)
    assert all(cache.get(digest) == (True, value) for digest, value in valid.items())
    assert cache.sizes == (100, 50)  # the refused keys are bounded on their own
    assert cache.get(key_hash("bk_flood_9999")) == (True, None)  # the newest refusals kept
    assert cache.get(key_hash("bk_flood_0")) == (False, None)  # the oldest made room


def test_a_full_cache_drops_its_least_recently_used_key_only() -> None:
    cache = KeyCache(ttl=60, max_entries=2)
    a, b, c = (key_hash(k) for k in ("bk_a", "bk_b", "bk_c"))
    cache.put(a, TenantKey("t", "a"))
    cache.put(b, TenantKey("t", "b"))
    assert cache.get(a)[0]  # a is now the most recently used
    cache.put(c, TenantKey("t", "c"))
    assert cache.get(a)[0] and cache.get(c)[0] and not cache.get(b)[0]


def test_cached_answers_expire_and_a_revival_or_revocation_replaces_the_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock(monkeypatch)
    cache = KeyCache(ttl=5)
    digest = key_hash(VALID)
    cache.put(digest, TenantKey("t", "k"))
    clock.now += 6
    assert cache.get(digest) == (False, None)
    cache.put(digest, TenantKey("t", "k"))
    cache.put(digest, None)  # revoked since
    assert cache.get(digest) == (True, None)
    cache.put(digest, TenantKey("t", "k"))
    assert cache.get(digest) == (True, TenantKey("t", "k"))


# -- failed authentications per client address ----------------------------------------------------


def test_failures_beyond_the_limit_wait_until_the_allowance_refills(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock(monkeypatch)
    limiter = FailureLimiter()
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1", 3) is None
        limiter.failed("10.0.0.1", 3)
    assert limiter.retry_after("10.0.0.1", 3) == 20  # one failure back every 60/3 s
    assert limiter.retry_after("10.0.0.2", 3) is None  # another address is not affected
    clock.now += 19
    assert limiter.retry_after("10.0.0.1", 3) == 1
    clock.now += 1
    assert limiter.retry_after("10.0.0.1", 3) is None
    limiter.failed("10.0.0.1", 3)
    assert limiter.retry_after("10.0.0.1", 3) == 20


def test_the_limiter_tracks_a_bounded_number_of_addresses() -> None:
    limiter = FailureLimiter(max_clients=10)
    for n in range(1000):
        limiter.failed(f"10.0.{n // 256}.{n % 256}", 1)
    assert len(limiter._buckets) == 10
    assert limiter.retry_after("10.0.3.231", 1) is not None  # the last one is still held


# -- the finance token's reach ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/internal/billing/summary", True),
        ("GET", "/internal/billing/transactions", True),
        ("GET", "/internal/billing/drift", True),
        ("GET", "/internal/billing/invoices", True),
        ("GET", "/internal/billing/invoices/INV-2026-01-000001", True),
        ("HEAD", "/internal/billing/summary/", True),
        ("POST", "/internal/billing/invoices", False),
        ("GET", "/internal/billing/summaryx", False),
        ("GET", "/internal/billing/credits", False),
        ("GET", "/internal/billing/prices/history", False),
        ("POST", "/internal/billing/quote", False),
        ("POST", "/v1/usage", False),
    ],
)
def test_the_finance_token_may_only_read_the_finance_routes(
    method: str, path: str, allowed: bool
) -> None:
    assert finance_may(method, path) is allowed


class CountingStore:
    """A tenant store that knows one key and counts its look-ups."""

    def __init__(self) -> None:
        self.lookups = 0

    async def authenticate(self, key: str) -> tuple[str, str] | None:
        self.lookups += 1
        return ("acme", "k1") if key == VALID else None

    async def unknown(self, tenant_ids: Any, *, create: bool) -> set[str]:
        return set()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[TestClient, CountingStore]]:
    settings = Settings(
        data_dir=tmp_path,
        catalogue_sync=False,
        admin_token=ADMIN,
        finance_token=FINANCE,
        auth_failures_per_minute=5,
        openrouter_base_url="http://127.0.0.1:9/api/v1",
    )
    with TestClient(create_app(settings)) as client:
        store = CountingStore()
        client.app.state.resources.tenants = store  # type: ignore[attr-defined]
        yield client, store


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_finance_reads_and_is_refused_everything_else(
    gateway: tuple[TestClient, CountingStore],
) -> None:
    client, _ = gateway
    # Past authentication (no database here: the route itself answers 422 or 503).
    for path in ("/internal/billing/summary", "/internal/billing/drift"):
        assert client.get(path, headers=bearer(FINANCE)).status_code in (422, 503)
        assert client.get(path, headers=bearer(ADMIN)).status_code in (422, 503)
    for method, path in (
        ("POST", "/internal/billing/credits"),
        ("GET", "/internal/billing/prices/history"),
        ("POST", "/internal/billing/quote"),
        ("POST", "/v1/usage"),
    ):
        refused = client.request(method, path, headers=bearer(FINANCE), json={})
        assert refused.status_code == 403, path
        assert "finance token" in refused.json()["error"]
        assert client.request(method, path, headers=bearer(ADMIN), json={}).status_code != 403
    wrong = client.get("/internal/billing/summary", headers=bearer("nope"))
    assert wrong.status_code == 401 and "error" in wrong.json()


def test_failed_admin_tokens_are_limited_per_address_in_the_billing_shape(
    gateway: tuple[TestClient, CountingStore],
) -> None:
    client, _ = gateway
    for _ in range(5):
        assert client.get("/internal/billing/summary", headers=bearer("guess")).status_code == 401
    limited = client.get("/internal/billing/summary", headers=bearer(ADMIN))
    assert limited.status_code == 429  # even the right token: guessing must not pay off
    assert int(limited.headers["retry-after"]) >= 1
    assert set(limited.json()) == {"error"} and "too many" in limited.json()["error"]


def test_failed_keys_on_the_proxies_are_limited_without_a_lookup_each(
    gateway: tuple[TestClient, CountingStore],
) -> None:
    client, store = gateway
    chat = {"model": "openai/gpt-4o-mini", "messages": []}
    assert client.post("/v1/chat/completions", json=chat, headers=bearer("bk_x")).status_code == 401
    assert store.lookups == 1
    for _ in range(4):  # the same unknown key again: answered from the cache
        refused = client.post("/v1/chat/completions", json=chat, headers=bearer("bk_x"))
        assert refused.status_code == 401
    assert store.lookups == 1
    for n in range(50):  # a flood of new keys: refused without asking the store
        flood = client.post("/v1/chat/completions", json=chat, headers=bearer(f"bk_{n}"))
        assert flood.status_code == 429
    assert store.lookups == 1
    body = flood.json()["error"]  # the SDKs' shape
    assert body["code"] == 429 and body["type"] == "rate_limit_error"
    assert int(flood.headers["retry-after"]) >= 1
    gemini = client.post(
        "/v1beta/models/gemini-2.5-flash:generateContent", json={}, headers=bearer("bk_y")
    )
    assert gemini.status_code == 429 and gemini.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    tenant_route = client.get("/v1/billing/summary", headers=bearer(VALID))
    assert tenant_route.status_code == 429 and "error" in tenant_route.json()


def test_the_dashboard_sign_in_counts_failures(
    gateway: tuple[TestClient, CountingStore],
) -> None:
    client, _ = gateway
    statuses = []
    for _ in range(7):
        form = client.get("/dashboard")
        csrf = form.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        signed = client.post(
            "/dashboard/sign-in",
            data={"csrf": csrf, "credential": "bk_wrong"},
            headers={"origin": "http://testserver"},
            follow_redirects=False,
        )
        statuses.append(signed.status_code)
    assert statuses == [401] * 5 + [429] * 2
    assert int(signed.headers["retry-after"]) >= 1


# -- refusing to listen openly without an admin token ---------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),  # noqa: S104
        ("::", False),
        ("10.1.2.3", False),
        ("gateway.example.com", False),
        ("", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_the_gateway_refuses_a_public_address_without_an_admin_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    served: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(kw))
    runner = CliRunner()
    refused = runner.invoke(main, ["--data-dir", str(tmp_path), "gateway", "--host", "0.0.0.0"])  # noqa: S104
    assert refused.exit_code == 1
    assert "BILLING_ADMIN_TOKEN" in refused.output and served == []
    for host in ("127.0.0.1", "::1", "localhost"):
        local = runner.invoke(main, ["--data-dir", str(tmp_path), "gateway", "--host", host])
        assert local.exit_code == 0, local.output
    assert [kw["host"] for kw in served] == ["127.0.0.1", "::1", "localhost"]
    monkeypatch.setenv("BILLING_ADMIN_TOKEN", ADMIN)
    public = runner.invoke(main, ["--data-dir", str(tmp_path), "gateway", "--host", "0.0.0.0"])  # noqa: S104
    assert public.exit_code == 0, public.output
    assert served[-1]["host"] == "0.0.0.0"  # noqa: S104


def test_a_blank_finance_token_lets_nobody_in(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, catalogue_sync=False, admin_token=ADMIN, finance_token=""
    )
    with TestClient(create_app(settings)) as client:
        for headers in ({}, {"Authorization": "Bearer "}, bearer("")):
            assert client.get("/internal/billing/drift", headers=headers).status_code == 401


def test_a_key_known_valid_still_passes_while_its_address_is_limited(
    gateway: tuple[TestClient, CountingStore],
) -> None:
    """Behind a proxy that does not forward addresses every client shares one: a guesser
    must not lock out the tenants whose keys this process has already checked."""
    client, store = gateway
    # Past authentication this route needs a database, which this gateway has not: 503.
    assert client.get("/v1/billing/summary", headers=bearer(VALID)).status_code == 503
    for n in range(6):
        client.get("/v1/billing/summary", headers=bearer(f"bk_guess_{n}"))
    assert client.get("/v1/billing/summary", headers=bearer("bk_new")).status_code == 429
    lookups = store.lookups
    assert client.get("/v1/billing/summary", headers=bearer(VALID)).status_code == 503
    assert store.lookups == lookups  # answered from the cache, nothing looked up
