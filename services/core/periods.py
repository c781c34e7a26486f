"""UTC calendar months: the read models' partitions, retention and (later) budgets and
invoices are cut by them. Pure date arithmetic; an instant's month is its UTC month."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta


def month_of(instant: datetime) -> date:
    """The first day of ``instant``'s UTC month (``instant`` must be timezone-aware)."""
    if instant.tzinfo is None:
        raise ValueError(f"{instant!r} has no timezone")
    utc = instant.astimezone(UTC)
    return date(utc.year, utc.month, 1)


def add_months(month: date, count: int) -> date:
    """The first day of the month ``count`` months after (before, when negative) ``month``."""
    index = month.year * 12 + month.month - 1 + count
    return date(index // 12, index % 12 + 1, 1)


def month_bounds(month: date) -> tuple[datetime, datetime]:
    """[first instant, first instant of the next month) of ``month``, in UTC."""
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    end = add_months(month, 1)
    return start, datetime(end.year, end.month, 1, tzinfo=UTC)


def months_of(instants: Iterable[datetime]) -> set[date]:
    """The distinct UTC months of ``instants``."""
    return {month_of(instant) for instant in instants}


def month_range(first: date, last: date) -> list[date]:
    """Every month from ``first`` to ``last``, both included (empty when ``last`` is earlier)."""
    months = []
    month = date(first.year, first.month, 1)
    while month <= last:
        months.append(month)
        month = add_months(month, 1)
    return months


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_grace(text: str) -> timedelta | None:
    """``"72h"``, ``"3d"``, ``"90m"``, ``"0s"`` → a duration; ``"off"`` → ``None``."""
    value = text.strip().lower()
    if value == "off":
        return None
    number, unit = value[:-1], value[-1:]
    if unit not in _UNITS or not number.isascii() or not number.isdigit() or len(number) > 9:
        raise ValueError(f"{text!r}: a duration such as 72h, 3d, 90m or 0s, or off")
    seconds = int(number) * _UNITS[unit]
    if seconds > 3650 * 86400:
        raise ValueError(f"{text!r}: at most ten years")
    return timedelta(seconds=seconds)


def closable_month(now: datetime, grace: timedelta) -> date:
    """The latest month that has been over for ``grace`` at ``now``."""
    return add_months(month_of(now - grace), -1)
