"""GET /internal/billing/drift and the projector's drift metrics, over real projected rows."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from services.adapters.database import init_connection
from services.adapters.settings import Settings
from services.core.events import ReportedCharge, UsageCounts, UsagePriced, UsageRecorded
from services.core.pricebook import InMemoryPriceBook
from services.core.rating import rate
from services.core.usage import parse_usage
from services.gateway.app import create_app
from services.projector.apply import apply_batch

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
SINCE, UNTIL = "2026-11-01T00:00:00Z", "2026-11-02T00:00:00Z"
GPT, SONNET = "openai/gpt-5", "anthropic/claude-sonnet-4.5"
WITHIN = Decimal("0.0001")
TOKEN = "drift-admin-token"


def fact(n: int, model: str, occurred_at: datetime) -> UsageRecorded:
    usage = parse_usage({"prompt_tokens": 1000 + 37 * n, "completion_tokens": 50 + 11 * n}).usage
    return UsageRecorded(
        request_id=f"req-{n}",
        tenant_id=f"tenant-{n % 2}",
        provider="openrouter",
        provider_model_id=model,
        occurred_at=occurred_at,
        recorded_at=occurred_at + timedelta(seconds=1),
        usage=UsageCounts.of(usage),
    )


def reported(kind: int, total: Decimal) -> ReportedCharge | None:
    """Six kinds of rows: exact, $0.0005 under, $0.00005 over, none, $0.002 over, BYOK."""
    match kind:
        case 0:
            return ReportedCharge(cost=total)
        case 1:
            return ReportedCharge(cost=total + Decimal("0.0005"))
        case 2:
            return ReportedCharge(cost=total - Decimal("0.00005"))
        case 3:
            return None
        case 4:
            return ReportedCharge(cost=total - Decimal("0.002"))
        case _:  # BYOK: usage.cost is OpenRouter's fee; the inference cost is what we price
            return ReportedCharge(
                cost=Decimal("0.00002"), upstream_inference_cost=total, is_byok=True
            )


def with_reported(event: UsagePriced, kind: int) -> UsagePriced:
    return event.model_copy(update={"reported": reported(kind, event.total_cost)})


@pytest.fixture
def events(snapshot_book: InMemoryPriceBook) -> list[UsagePriced]:
    """24 requests inside the window (two models, each with every kind), two outside."""
    out = []
    for n in range(24):
        model = GPT if (n // 6) % 2 else SONNET
        event = rate(fact(n, model, T0 + timedelta(minutes=n)), snapshot_book, priced_at=T0)
        out.append(with_reported(event, n % 6))
    for n, when in ((24, T0 - timedelta(hours=12, seconds=1)), (25, T0 + timedelta(hours=12))):
        out.append(with_reported(rate(fact(n, GPT, when), snapshot_book, priced_at=T0), 4))
    return out


def charge_of(event: UsagePriced) -> Decimal | None:
    r = event.reported
    if r is None:
        return None
    return r.upstream_inference_cost if r.is_byok else r.cost


def block(events: list[UsagePriced]) -> dict[str, Any]:
    """The drift answer's shape, recomputed here from the events (money as Decimal)."""
    checked = [(e.total_cost, c) for e in events if (c := charge_of(e)) is not None]
    within = sum(abs(t - c) < WITHIN for t, c in checked)
    computed = sum((t for t, _ in checked), Decimal(0))
    reported_total = sum((c for _, c in checked), Decimal(0))
    share = None
    if checked:
        share = str((Decimal(within) / len(checked)).quantize(Decimal("0.0001")))
    return {
        "counts": {
            "transactions": len(events),
            "with_reported_cost": len(checked),
            "without_reported_cost": len(events) - len(checked),
            "within_tolerance": within,
        },
        "share_within_tolerance": share,
        "sums": {
            "computed": computed,
            "reported": reported_total,
            "difference": computed - reported_total,
            "computed_without_reported_cost": sum(
                (e.total_cost for e in events if charge_of(e) is None), Decimal(0)
            ),
        },
    }


def decimals(body: dict[str, Any]) -> dict[str, Any]:
    """The answer with every sum as a Decimal (the wire has decimal strings)."""

    def convert(b: dict[str, Any]) -> dict[str, Any]:
        assert all(isinstance(v, str) for v in b["sums"].values())
        return b | {"sums": {k: Decimal(v) for k, v in b["sums"].items()}}

    return convert(body) | {"worst_models": [convert(m) for m in body["worst_models"]]}


def expected_answer(
    events: list[UsagePriced], model: str | None = None, top: int = 10
) -> dict[str, Any]:
    start, end = datetime.fromisoformat(SINCE), datetime.fromisoformat(UNTIL)
    inside = [
        e for e in events if start <= e.occurred_at < end and (model is None or e.model == model)
    ]
    models = sorted({e.model for e in inside})
    per_model = [{"model": m} | block([e for e in inside if e.model == m]) for m in models]
    per_model.sort(key=lambda b: (-abs(b["sums"]["difference"]), b["model"]))
    return {
        "since": "2026-11-01T00:00:00+00:00",
        "until": "2026-11-02T00:00:00+00:00",
        "model": model,
        "currency": "USD",
        "tolerance": "0.0001",
        **block(inside),
        "worst_models": per_model[:top],
    }


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def drift_metrics() -> tuple[float, float, float]:
    return (
        sample("billing_reported_cost_checked_total", outcome="within"),
        sample("billing_reported_cost_checked_total", outcome="outside"),
        sample("billing_reported_cost_drift_usd_count"),
    )


@pytest.fixture
async def projected(
    database_url: str, events: list[UsagePriced], snapshot_book: InMemoryPriceBook
) -> list[UsagePriced]:
    """Apply the events, then a cheaper revision of two of them (and duplicates); return
    the events as the database now holds them. Checks the metrics along the way."""
    cheaper = InMemoryPriceBook()
    for model in snapshot_book.models():
        pricing = snapshot_book.lookup(model, T0).pricing
        half = pricing.__class__(prompt=pricing.prompt / 2, completion=pricing.completion / 2)
        cheaper.record(model, half, effective_from=T0 - timedelta(days=365))
    revised: dict[int, UsagePriced] = {}
    for n in (1, 4):
        again = fact(n, events[n].provider_model_id, events[n].occurred_at)
        previous = events[n].total_cost
        rerated = rate(again, cheaper, priced_at=T0, revision=2, previous_total=previous)
        revised[n] = rerated.model_copy(update={"reported": events[n].reported})
    connection = await asyncpg.connect(database_url)
    await init_connection(connection)
    try:
        before = drift_metrics()
        await apply_batch(connection, "projector", events, {})
        after = drift_metrics()
        checked = [(e.total_cost, c) for e in events if (c := charge_of(e)) is not None]
        within = sum(abs(t - c) < WITHIN for t, c in checked)
        assert after[0] - before[0] == within
        assert after[1] - before[1] == len(checked) - within
        assert after[2] - before[2] == len(checked)
        # Revisions and redeliveries are not checked again: each request counts once.
        result = await apply_batch(connection, "projector", [*revised.values(), *events], {})
        assert result.revised == 2
        assert all(revised[n].total_cost < events[n].total_cost for n in revised)
        assert drift_metrics() == after
    finally:
        await connection.close()
    return [revised.get(n, e) for n, e in enumerate(events)]


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path, catalogue_sync=False, database_url=database_url)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_every_field_of_the_drift_answer(client: TestClient, projected: list[UsagePriced]) -> None:
    response = client.get("/internal/billing/drift", params={"since": SINCE, "until": UNTIL})
    assert response.status_code == 200, response.text
    body = response.json()
    assert decimals(body) == expected_answer(projected)
    # The data covers what it should: both models, rows of every kind, revised rows.
    assert {m["model"] for m in body["worst_models"]} == {GPT, SONNET}
    assert body["counts"]["transactions"] == 24
    assert body["counts"]["without_reported_cost"] == 4
    assert 0 < body["counts"]["within_tolerance"] < body["counts"]["with_reported_cost"] == 20
    assert [e.revision for e in projected[:5]] == [1, 2, 1, 1, 2]


def test_the_answer_by_model_and_the_top_models(
    client: TestClient, projected: list[UsagePriced]
) -> None:
    for model in (GPT, SONNET):
        body = client.get(
            "/internal/billing/drift", params={"since": SINCE, "until": UNTIL, "model": model}
        ).json()
        assert decimals(body) == expected_answer(projected, model=model)
        assert [m["model"] for m in body["worst_models"]] == [model]
    top = client.get(
        "/internal/billing/drift", params={"since": SINCE, "until": UNTIL, "top": 1}
    ).json()
    assert decimals(top) == expected_answer(projected, top=1)
    assert len(top["worst_models"]) == 1


def test_an_empty_window(client: TestClient, projected: list[UsagePriced]) -> None:
    body = client.get(
        "/internal/billing/drift",
        params={"since": "2020-01-01T00:00:00Z", "until": "2020-02-01T00:00:00+01:00"},
    ).json()
    assert body["counts"] == {
        "transactions": 0,
        "with_reported_cost": 0,
        "without_reported_cost": 0,
        "within_tolerance": 0,
    }
    assert body["share_within_tolerance"] is None
    assert set(body["sums"].values()) == {"0"}
    assert body["worst_models"] == []
    assert body["until"] == "2020-01-31T23:00:00+00:00"  # normalised to UTC


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"until": UNTIL}, "since"),
        ({"since": SINCE}, "until"),
        ({"since": "yesterday", "until": UNTIL}, "since"),
        ({"since": SINCE, "until": "2026-13-01T00:00:00Z"}, "until"),
        ({"since": "2026-11-01T00:00:00", "until": UNTIL}, None),  # no timezone
        ({"since": SINCE, "until": "0001-01-01T00:00:00+01:00"}, None),  # out of range
        ({"since": UNTIL, "until": SINCE}, None),  # until before since
        ({"since": SINCE, "until": SINCE}, None),  # an empty interval
        ({"since": SINCE, "until": UNTIL, "model": "a\x00b"}, None),
        ({"since": SINCE, "until": UNTIL, "top": "0"}, "top"),
        ({"since": SINCE, "until": UNTIL, "top": "101"}, "top"),
    ],
)
def test_bad_parameters_are_422_with_the_error_shape(
    client: TestClient, params: dict[str, str], field: str | None
) -> None:
    response = client.get("/internal/billing/drift", params=params)
    assert response.status_code == 422, response.text
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    if field is not None:
        assert body["field"] == field
    else:
        assert set(body) == {"error"}


def test_the_admin_token_is_required_when_set(database_url: str, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, catalogue_sync=False, database_url=database_url, admin_token=TOKEN
    )
    params = {"since": SINCE, "until": UNTIL}
    with TestClient(create_app(settings)) as client:
        missing = client.get("/internal/billing/drift", params=params)
        wrong = client.get(
            "/internal/billing/drift", params=params, headers={"Authorization": "Bearer nope"}
        )
        right = client.get(
            "/internal/billing/drift", params=params, headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert missing.status_code == 401 and "admin token" in missing.json()["error"]
    assert wrong.status_code == 401
    assert right.status_code == 200, right.text
    assert right.json()["counts"]["transactions"] == 0


def test_no_database_is_503(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(data_dir=tmp_path, catalogue_sync=False))) as client:
        response = client.get("/internal/billing/drift", params={"since": SINCE, "until": UNTIL})
    assert response.status_code == 503
    assert "BILLING_DATABASE_URL" in response.json()["error"]
