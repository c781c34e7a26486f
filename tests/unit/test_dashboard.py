"""The dashboard's pure parts: money as shown, series buckets, rates now, the session's
signatures and CSRF tokens, the answer cache and the reading of a service's metrics."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.adapters.settings import Settings
from services.core.dashboard import (
    day_rows,
    money,
    rate_now,
    series,
    series_bounds,
    share,
    shown_usd,
)
from services.gateway.dashboard.session import SessionKeys, same_origin
from services.gateway.dashboard.state import AnswerCache, health_of

D = Decimal
NOW = datetime(2026, 12, 3, 10, 42, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        ("0", "$0.00"),
        ("1234.565", "$1,234.56"),  # half-even, as invoices round
        ("1234.575", "$1,234.58"),
        ("0.004213", "$0.0042"),  # below a cent: four places, never $0.00
        ("0.00000001", "<$0.0001"),
        ("0.00006", "$0.0001"),
        ("-2.5", "-$2.50"),
        ("1000000000.999", "$1,000,000,001.00"),
    ],
)
def test_money_is_shown_in_cents_and_small_spend_is_not_zero(amount: str, shown: str) -> None:
    assert shown_usd(D(amount)) == shown
    assert D(money(D(amount))["exact"]) == D(amount)


@given(st.decimals(min_value=D("-1e9"), max_value=D("1e9"), places=9, allow_nan=False))
def test_the_exact_spelling_is_every_digit(amount: Decimal) -> None:
    assert D(money(amount)["exact"]) == amount


def test_a_24_hour_series_has_every_hour_and_ends_with_this_one() -> None:
    start, end = series_bounds(NOW, "hour", "24h")
    assert (start, end) == (
        datetime(2026, 12, 2, 11, tzinfo=UTC),
        datetime(2026, 12, 3, 11, tzinfo=UTC),
    )
    rows = {datetime(2026, 12, 3, 10, tzinfo=UTC): (3, D("0.5")), start: (1, D("0.1"))}
    points = series(rows, NOW, "hour", "24h")
    assert len(points) == 24
    assert (points[0].requests, points[-1].requests) == (1, 3)
    assert sum(p.requests for p in points) == 4 and sum(p.cost for p in points) == D("0.6")
    assert points[-1].json() == {
        "t": int(datetime(2026, 12, 3, 10, tzinfo=UTC).timestamp()),
        "requests": 3,
        "exact": "0.5",
        "shown": "$0.50",
    }


def test_a_30_day_series_by_day_and_by_hour() -> None:
    by_day = series(day_rows([(date(2026, 11, 4), 2, D("1"))]), NOW, "day", "30d")
    assert len(by_day) == 30 and by_day[0].start == datetime(2026, 11, 4, tzinfo=UTC)
    assert by_day[0].requests == 2 and by_day[-1].start == datetime(2026, 12, 3, tzinfo=UTC)
    assert len(series({}, NOW, "hour", "30d")) == 720
    assert len(series({}, NOW, "day", "24h")) == 1


def test_rates_now_count_this_minute_and_the_one_before() -> None:
    rate = rate_now(90, D("0.9"), NOW)  # 90 requests over 90 s (10:41:00 to 10:42:30)
    assert rate.requests_per_minute == D("60.0") and rate.cost_per_minute == D("0.600000")
    assert rate_now(0, D(0), NOW).json()["cost_per_minute"]["shown"] == "$0.00"


def test_gauges_are_bounded_and_absent_without_a_limit() -> None:
    assert share(D("5"), D("10")) == 0.5
    assert share(D("15"), D("10")) == 1.0 and share(D("-1"), D("10")) == 0.0
    assert share(D("1"), None) is None and share(D("1"), D("0")) is None


def test_a_session_cookie_carries_a_signed_random_id_and_expires() -> None:
    keys = SessionKeys(b"k" * 32, hours=1)
    session_id = keys.new_session_id()
    cookie = keys.cookie(session_id)
    assert keys.session_id(cookie) == session_id
    assert keys.session_id(cookie[:-1] + ("A" if cookie[-1] != "A" else "B")) is None
    assert SessionKeys(b"other" * 8, hours=1).session_id(cookie) is None
    assert keys.session_id(None) is None and keys.session_id("") is None
    assert keys.digest(session_id) != session_id.encode() and len(keys.digest(session_id)) == 32
    expired = SessionKeys(b"k" * 32, hours=1)
    expired.max_age = -1  # the signature's timestamp is checked, not only the cookie's age
    assert expired.session_id(cookie) is None


def test_csrf_tokens_bind_a_form_to_its_cookie_or_session() -> None:
    keys = SessionKeys(b"k" * 32, hours=1)
    form = keys.sign_in_form()
    assert keys.sign_in_matches(form.nonce, form.token)
    other = keys.sign_in_form()
    assert not keys.sign_in_matches(other.nonce, form.token)  # another browser's cookie
    assert not keys.sign_in_matches(None, form.token)
    assert not keys.sign_in_matches(form.nonce, form.nonce)  # unsigned
    assert keys.csrf_matches("s1", keys.csrf("s1")) and not keys.csrf_matches("s2", keys.csrf("s1"))


def test_a_form_from_another_origin_is_not_same_origin() -> None:
    assert same_origin(None, "http://gw:8080")
    assert same_origin("http://gw:8080", "http://gw:8080")
    assert not same_origin("https://evil.example", "http://gw:8080")
    assert not same_origin("null", "http://gw:8080")
    assert not same_origin("http://gw:8080", "https://gw:8080")  # behind a TLS proxy


async def test_the_answer_cache_shares_one_read_and_forgets_failures() -> None:
    cache = AnswerCache(ttl=0.2, max_entries=2)
    reads = 0

    async def read() -> int:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.01)
        return reads

    assert await asyncio.gather(*(cache.get("k", read) for _ in range(5))) == [1] * 5
    await asyncio.sleep(0.25)
    assert await cache.get("k", read) == 2

    async def fail() -> int:
        raise RuntimeError("database away")

    with pytest.raises(RuntimeError):
        await cache.get("f", fail)
    assert await cache.get("f", read) == 3  # a failure is not served again
    await cache.get("a", read)
    await cache.get("b", read)
    assert len(cache._entries) <= 2  # bounded


def test_a_services_health_is_read_from_its_metrics() -> None:
    text = "\n".join(
        [
            "# TYPE billing_pipeline_lag_seconds gauge",
            'billing_pipeline_lag_seconds{service="projector"} 0.42',
            "# TYPE billing_projected_events_total counter",
            "billing_projected_events_total 1200.0",
            "# TYPE billing_dead_lettered_total counter",
            'billing_dead_lettered_total{source="projector"} 3.0',
            "# TYPE process_resident_memory_bytes gauge",
            "process_resident_memory_bytes 5.0e7",
        ]
    )
    health = health_of("projector", text)
    assert (health.up, health.lag_seconds, health.processed) == (True, 0.42, 1200.0)
    assert (health.dead_lettered, health.memory_bytes) == (3.0, 5.0e7)


def test_pipeline_endpoints_are_checked_settings() -> None:
    settings = Settings(pipeline_metrics="pricer=http://127.0.0.1:8081/metrics, quota=http://h:1/")
    assert settings.pipeline_endpoints == [
        ("pricer", "http://127.0.0.1:8081/metrics"),
        ("quota", "http://h:1/"),
    ]
    with pytest.raises(ValueError, match="name=http"):
        Settings(pipeline_metrics="pricer=127.0.0.1:8081")


def test_series_bounds_are_whole_buckets() -> None:
    for step, window, count in (("hour", "24h", 24), ("day", "30d", 30)):
        start, end = series_bounds(NOW, step, window)  # type: ignore[arg-type]
        width = timedelta(hours=1) if step == "hour" else timedelta(days=1)
        assert (end - start) / width == count and start <= NOW < end


def test_an_empty_session_secret_is_unset_and_a_short_one_refused() -> None:
    assert Settings(session_secret="").session_secret is None
    assert Settings(session_secret="x" * 16).session_secret is not None
    with pytest.raises(ValueError, match="at least 16"):
        Settings(session_secret="short")
