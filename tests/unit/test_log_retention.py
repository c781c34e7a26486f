"""What the s3 log's retention may delete (``services.local.logretention``): pure rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from services.cli.main import main
from services.local.logretention import (
    Batch,
    LogRetention,
    by_partition,
    crowded,
    duration_text,
    lowest_needed,
    parse_batch,
    trimmable,
)

T0 = datetime(2026, 12, 1, tzinfo=UTC)
PREFIX = "clusters/tansu_cluster/topics"


def key(topic: str, partition: int, base: int) -> str:
    return f"{PREFIX}/{topic}/partitions/{partition:010d}/records/{base:020d}.batch"


def batches(*bases: int, minutes_apart: int = 1) -> list[Batch]:
    return [
        Batch(key("u", 0, base), "u", 0, base, T0 + timedelta(minutes=i * minutes_apart))
        for i, base in enumerate(bases)
    ]


def test_batch_keys_are_parsed_and_other_objects_ignored() -> None:
    assert parse_batch(key("billing.usage.v1", 3, 1234), T0) == Batch(
        key("billing.usage.v1", 3, 1234), "billing.usage.v1", 3, 1234, T0
    )
    assert parse_batch(f"{PREFIX}/u/partitions/0000000000/watermark.json", T0) is None
    assert parse_batch("clusters/tansu_cluster/meta.json", T0) is None
    assert parse_batch(key("u", 0, 1).replace("tansu_cluster", "other"), T0) is None
    assert parse_batch(key("u", 0, 1) + ".tmp", T0) is None


def test_only_old_and_consumed_batches_go_as_a_prefix_and_never_the_last() -> None:
    log = batches(0, 10, 25, 40, 41)  # written at T0, +1, +2, +3, +4 min
    late = T0 + timedelta(hours=1)
    # batch [0, 10) is consumed once every consumer is at 10 or beyond
    assert trimmable(log, late, needed_from=9) == []
    assert [b.base_offset for b in trimmable(log, late, needed_from=10)] == [0]
    assert [b.base_offset for b in trimmable(log, late, needed_from=40)] == [0, 10, 25]
    # everything consumed: still the last batch stays (Tansu's newest, the log's end)
    assert [b.base_offset for b in trimmable(log, late, needed_from=10**9)] == [0, 10, 25, 40]
    # nobody in the stack reads it: age alone
    assert [b.base_offset for b in trimmable(log, late, needed_from=None)] == [0, 10, 25, 40]
    # age: batches written at or after the cutoff stay, and so does all after them
    cutoff = T0 + timedelta(minutes=2)
    assert [b.base_offset for b in trimmable(log, cutoff, needed_from=None)] == [0, 10]
    # a prefix only: an old batch after a young one is not taken
    mixed = [
        *batches(0, 10),
        Batch(key("u", 0, 20), "u", 0, 20, T0 + timedelta(days=1)),
        Batch(key("u", 0, 30), "u", 0, 30, T0),
    ]
    assert [b.base_offset for b in trimmable(mixed, T0 + timedelta(hours=1), None)] == [0, 10]
    assert trimmable([], late, None) == [] and trimmable(log[:1], late, None) == []


def test_partitions_are_grouped_in_offset_order_and_crowded_ones_named() -> None:
    found = [
        Batch(key("u", 1, 5), "u", 1, 5, T0),
        Batch(key("u", 0, 7), "u", 0, 7, T0),
        Batch(key("u", 1, 2), "u", 1, 2, T0),
        Batch(key("c", 0, 0), "c", 0, 0, T0),
    ]
    grouped = by_partition(found)
    assert [b.base_offset for b in grouped[("u", 1)]] == [2, 5]
    assert crowded(grouped, 1) == [(("u", 1), 2)]
    assert crowded(grouped, 2) == []


def test_durations_read_back_in_their_largest_unit() -> None:
    assert duration_text(timedelta(days=7)) == "7d"
    assert duration_text(timedelta(hours=36)) == "36h"
    assert duration_text(timedelta(minutes=90)) == "90m"
    assert duration_text(timedelta(seconds=61)) == "61s"


class FakeStore:
    """The two S3 calls the sweep makes, over a dict of key → last modified."""

    def __init__(self, objects: dict[str, datetime]) -> None:
        self.objects = objects

    def get_paginator(self, _name: str) -> Any:
        store = self

        class Pages:
            def paginate(self, Bucket: str, Prefix: str) -> list[dict[str, Any]]:  # noqa: N803
                keys = sorted(k for k in store.objects if k.startswith(Prefix))
                return [
                    {"Contents": [{"Key": k, "LastModified": store.objects[k]} for k in keys[:2]]},
                    {"Contents": [{"Key": k, "LastModified": store.objects[k]} for k in keys[2:]]},
                ]

        return Pages()

    def delete_objects(self, Bucket: str, Delete: dict[str, Any]) -> dict[str, Any]:  # noqa: N803
        for item in Delete["Objects"]:
            del self.objects[item["Key"]]
        return {}


def test_a_sweep_trims_guarded_topics_to_their_positions_and_others_by_age() -> None:
    store = FakeStore(
        {key("u", 0, b): T0 for b in (0, 5, 9)}
        | {key("u", 1, b): T0 for b in (0, 3)}
        | {key("dlq", 0, b): T0 for b in (0, 1, 2)}
        | {f"{PREFIX}/u/partitions/0000000000/watermark.json": T0}
    )
    # "u" is read by the stack: partition 0 needs offsets from 9 on, partition 1 is unknown
    store.objects |= {key("other.u", 0, b): T0 for b in (0, 1, 2)}  # not the stack's topic
    said: list[str] = []
    vacuums: list[int] = []
    retention = LogRetention(
        store,
        "tansu",
        timedelta(minutes=5),
        lambda: {("u", 0): 9},  # the broker did not describe u[1]: it waits
        echo=said.append,
        vacuum=lambda: vacuums.append(1),
        topics=["u", "dlq"],
        guarded=["u"],
    )
    swept = retention.sweep(now=T0 + timedelta(hours=1))
    assert swept.batches == 8 and swept.trimmed == 4
    assert said == ["retention   first 4 batches trimmed from the log's start"]
    assert retention.sweep(now=T0 + timedelta(hours=1)).trimmed == 0 and len(said) == 1
    assert sorted(store.objects) == sorted(
        [key("u", 0, 9), key("u", 1, 0), key("u", 1, 3), key("dlq", 0, 2)]
        + [key("other.u", 0, b) for b in (0, 1, 2)]
        + [f"{PREFIX}/u/partitions/0000000000/watermark.json"]
    )
    assert vacuums == [1]  # after a trim only, and at most every 2 minutes
    store.objects[key("dlq", 0, 3)] = T0  # makes dlq[0]@2 trimmable
    assert retention.sweep(now=T0 + timedelta(hours=1)).trimmed == 1 and vacuums == [1]


def test_a_partition_held_back_by_a_reader_is_named_with_retention_on_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("services.local.logretention.CROWDED_BATCHES", 2)
    store = FakeStore({key("u", 0, b): T0 for b in range(4)})
    said: list[str] = []
    retention = LogRetention(
        store, "tansu", timedelta(minutes=1), lambda: {("u", 0): 0}, said.append, guarded=["u"]
    )
    assert retention.sweep(now=T0 + timedelta(days=1)).trimmed == 0
    assert len(said) == 1 and "is one stopped?" in said[0], said


def test_without_retention_nothing_goes_and_a_crowded_partition_is_named_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("services.local.logretention.CROWDED_BATCHES", 2)
    store = FakeStore({key("u", 0, b): T0 for b in range(4)})
    said: list[str] = []
    retention = LogRetention(store, "tansu", None, dict, echo=said.append)
    assert retention.sweep(now=T0 + timedelta(days=9)).crowded == [(("u", 0), 4)]
    retention.sweep(now=T0 + timedelta(days=9))
    assert len(store.objects) == 4
    assert len(said) == 1 and "u[0] holds 4 batches" in said[0], said


@pytest.mark.parametrize(
    ("value", "error"),
    [("30s", "at least 1m"), ("3x", "a duration such as"), ("-5m", "a duration such as")],
)
def test_billing_up_refuses_a_retention_it_cannot_keep(
    value: str, error: str, tmp_path: Path
) -> None:
    arguments = ["--data-dir", str(tmp_path), "up", "--broker-retention", value]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2 and error in result.output, result.output


def test_a_partition_needs_what_its_slowest_reader_has_not_read_and_all_if_one_read_nothing() -> (
    None
):
    assert lowest_needed([7, 4, 12]) == 4
    assert lowest_needed([7, None]) == 0  # e.g. the quota service never stored a position
    assert lowest_needed([7, -1]) == 0  # a group with no committed offset
    assert lowest_needed([]) == 0
