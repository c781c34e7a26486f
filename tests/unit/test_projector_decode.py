"""``decode_priced``'s plain path: the events this pipeline writes, decoded without pydantic's
Python validators, must come out exactly as the full decode makes them, and everything else
must still take the full decode (so invalid input still raises and is dead-lettered)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from services.core.events import (
    ReportedCharge,
    UsagePriced,
    _decode,
    _decode_priced_plain,
    decode_priced,
)
from tests.unit.test_projector_plan import facts, priced

COSTS = [Decimal("0.000123"), Decimal(0), Decimal("1.5"), Decimal(0), Decimal(0), Decimal(0),
         Decimal("0.01"), Decimal(0)]  # fmt: skip


def full(value: bytes) -> UsagePriced:
    return _decode(UsagePriced, value)


def same(a: BaseModel, b: BaseModel) -> None:
    """Equal as models and in every stored attribute, nested models included."""
    assert type(a) is type(b)
    assert a == b
    assert a.model_fields_set == b.model_fields_set
    assert a.__pydantic_extra__ == b.__pydantic_extra__
    assert a.__pydantic_private__ == b.__pydantic_private__
    assert list(a.__dict__) == list(b.__dict__)
    for name, value in a.__dict__.items():
        other = b.__dict__[name]
        if isinstance(value, BaseModel):
            same(value, other)
        else:
            assert type(value) is type(other), name
            assert value == other, name
            if hasattr(value, "tzinfo"):
                assert value.tzinfo is other.tzinfo, name
    assert a.model_dump_json() == b.model_dump_json()


def example(**changes: Any) -> dict[str, Any]:
    """A UsagePriced as the pipeline writes it, as a JSON document, with ``changes``."""
    event = priced("req-1", 2, costs=COSTS, reported=Decimal("0.0123"))
    document = json.loads(event.model_dump_json())
    document.update(changes)
    return document


def encoded(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


@settings(max_examples=200, deadline=None)
@given(event=st.integers(1, 4).flatmap(lambda revision: facts("req-1", revision)))
def test_the_plain_path_builds_exactly_what_the_full_decode_builds(event: UsagePriced) -> None:
    value = event.model_dump_json().encode()
    plain = _decode_priced_plain(value)
    assert plain is not None, "the pipeline's own spelling must take the plain path"
    same(plain, full(value))
    assert decode_priced(value) == event


def test_byok_charges_metadata_tiers_and_estimated_usage_take_the_plain_path() -> None:
    document = example(
        reported={"cost": "0.001", "upstream_inference_cost": "0.5", "is_byok": True},
        metadata={"app": "bench", "team": "ünïcode ✓"},
        pricing_tier={"min_prompt_tokens": 200000},
        usage_source="estimated",
        api_key_id=None,
    )
    plain = _decode_priced_plain(encoded(document))
    assert plain is not None
    assert plain.reported == ReportedCharge(
        cost=Decimal("0.001"), upstream_inference_cost=Decimal("0.5"), is_byok=True
    )
    same(plain, full(encoded(document)))


@pytest.mark.parametrize(
    "changes",
    [
        {"total_cost": "1.5E-3"},  # valid money, not in the plain spelling
        {"delta_cost": " 0.5 "},
        {"previous_total_cost": 0},  # an integer is valid money
        {"reported": {"cost": "0.01"}},  # defaults left out
        {"price_version": "7"},  # lax integers and booleans
        {"revision": True},
        {"reported": {"cost": "1", "upstream_inference_cost": None, "is_byok": 1}},
        {"occurred_at": "2026-11-01T18:30:00+05:00"},  # another offset: brought to UTC
    ],
)
def test_other_valid_spellings_decode_as_before(changes: dict[str, Any]) -> None:
    value = encoded(example(**changes))
    same(decode_priced(value), full(value))


def test_an_event_without_its_defaulted_fields_takes_the_full_decode() -> None:
    document = example()
    del document["reason"], document["currency"], document["metadata"]
    value = encoded(document)
    assert _decode_priced_plain(value) is None
    same(decode_priced(value), full(value))


BAD_USAGE = {**example()["usage"], "uncached_input_tokens": 1}


@pytest.mark.parametrize(
    "value",
    [
        encoded(example(total_cost=0.5)),  # a binary float
        encoded(example(breakdown={**example()["breakdown"], "prompt_cost": 1e-5})),
        encoded(example(total_cost="1.2.3")),
        encoded(example(total_cost="12345678901")),  # out of range
        encoded(example(delta_cost="0." + "1" * 31)),  # more than 30 places
        encoded(example(request_id="")),
        encoded(example(tenant_id="acme\x00")),
        encoded(example(model="m" * 257)),
        encoded(example(usage=BAD_USAGE)),  # does not add up
        encoded(example(usage={**example()["usage"], "images": -1})),
        encoded(example(usage={**example()["usage"], "images": 1.0})),
        encoded(example(usage={**example()["usage"], "images": 10**12})),
        encoded(example(revision=0)),
        encoded(example(occurred_at="2026-11-01T12:00:00")),  # no timezone
        encoded(example(priced_at="yesterday")),
        encoded(example(currency="EUR")),
        encoded(example(event_type="UsageRecorded")),
        encoded(example(schema_version=9)),
        encoded(example(surprise=1)),  # extra field
        encoded(example(metadata={"k": "v" * 2049})),
        encoded(example(metadata={"": "v"})),
        encoded(example(reason="r" * 1001)),
        encoded(example(pricing_tier={"min_prompt_tokens": "x"})),
        b"\x00 not an event",
        b"[1, 2]",
        b'{"request_id": "\\ud800"}',
        b"",
    ],
)
def test_invalid_events_still_raise(value: bytes) -> None:
    assert _decode_priced_plain(value) is None
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        decode_priced(value)


def test_a_tombstone_still_raises() -> None:
    with pytest.raises(ValueError, match="no value"):
        decode_priced(None)  # type: ignore[arg-type]
