"""UTC calendar months (services.core.periods) and the partition schedule built on them."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from services.adapters.partitions import months_ahead, partition_name, retention_cutoff
from services.core.periods import add_months, month_bounds, month_of, month_range, months_of


def test_an_instants_month_is_its_utc_month() -> None:
    tokyo = timezone(timedelta(hours=9))
    assert month_of(datetime(2026, 12, 1, 8, 59, tzinfo=tokyo)) == date(2026, 11, 1)
    assert month_of(datetime(2026, 12, 1, 9, 0, tzinfo=tokyo)) == date(2026, 12, 1)
    with pytest.raises(ValueError, match="no timezone"):
        month_of(datetime(2026, 12, 1))  # noqa: DTZ001 - the point of the test


def test_month_arithmetic_crosses_years_both_ways() -> None:
    assert add_months(date(2026, 11, 1), 2) == date(2027, 1, 1)
    assert add_months(date(2026, 1, 1), -1) == date(2025, 12, 1)
    assert add_months(date(2026, 3, 1), -27) == date(2023, 12, 1)
    assert month_bounds(date(2026, 12, 1)) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert month_range(date(2026, 11, 1), date(2027, 2, 1)) == [
        date(2026, 11, 1),
        date(2026, 12, 1),
        date(2027, 1, 1),
        date(2027, 2, 1),
    ]
    assert month_range(date(2026, 11, 1), date(2026, 10, 1)) == []
    assert months_of(
        [datetime(2026, 11, 30, 23, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC)]
    ) == {date(2026, 11, 1)}


def test_partition_schedule() -> None:
    now = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert months_ahead(now) == [date(2026, 12, 1), date(2027, 1, 1), date(2027, 2, 1)]
    assert retention_cutoff(now, 12) == date(2025, 12, 1)  # Dec 2025 .. Dec 2026 kept
    assert retention_cutoff(now, 1) == date(2026, 11, 1)
    assert (
        partition_name("billing_transactions", date(2003, 5, 1)) == "billing_transactions_y2003m05"
    )


def test_long_index_names_stay_distinct() -> None:
    from services.adapters.partitions import _identifier

    part = "billing_transactions_before_rebuild_20261202122435_y2027m01"
    names = {_identifier(f"{part}_{role}") for role in ("tenant_time", "tenant_model_time")}
    assert len(names) == 2 and all(len(n) <= 63 for n in names)
    assert _identifier("billing_transactions_y2027m01_pkey") == "billing_transactions_y2027m01_pkey"


def test_grace_durations_and_the_month_they_make_closable() -> None:
    from datetime import timedelta

    import pytest

    from services.core.periods import closable_month, parse_grace

    assert parse_grace("72h") == timedelta(hours=72)
    assert parse_grace("3d") == parse_grace("4320m") == timedelta(days=3)
    assert parse_grace("0s") == timedelta(0)
    assert parse_grace("off") is None and parse_grace(" OFF ") is None
    for bad in ("", "72", "h", "-1h", "1.5h", "3w", "٣d"):
        with pytest.raises(ValueError, match="a duration such as"):
            parse_grace(bad)
    grace = timedelta(hours=72)
    # November ends on 1 December 00:00 UTC: closable 72 h later, not a minute before.
    assert closable_month(datetime(2026, 12, 4, 0, 0, tzinfo=UTC), grace) == date(2026, 11, 1)
    assert closable_month(datetime(2026, 12, 3, 23, 59, tzinfo=UTC), grace) == date(2026, 10, 1)
    assert closable_month(datetime(2027, 1, 1, tzinfo=UTC), timedelta(0)) == date(2026, 12, 1)
