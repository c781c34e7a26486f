"""The committed JSON Schemas are exactly what the event models generate."""

from __future__ import annotations

from services.adapters.schemas import SCHEMA_DIR, generate


def test_committed_schemas_match_the_models() -> None:
    generated = generate()
    assert set(generated) == {
        "usage_recorded.v1.json",
        "usage_priced.v1.json",
        "quota_alert.v1.json",
        "invoice_issued.v1.json",
    }
    for name, text in generated.items():
        path = SCHEMA_DIR / name
        assert path.exists(), f"{name} is missing: run `billing schemas`"
        assert path.read_text() == text, f"{name} drifted from the model: run `billing schemas`"


def test_money_is_a_decimal_string_in_the_schema() -> None:
    text = generate()["usage_priced.v1.json"]
    assert '"total_cost": {\n      "description": "USD"' in text
