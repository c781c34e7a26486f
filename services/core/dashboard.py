"""What the dashboard shows, as pure functions: money as people read it (and exactly, for the
hover), spend series with every bucket present, and rates "now" from per-minute counts.

No I/O: the gateway's dashboard routes read the tables and hand the rows here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Literal

from services.core.money import fmt, product

Step = Literal["hour", "day"]
Window = Literal["24h", "30d"]
STEPS: dict[str, timedelta] = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
WINDOWS: dict[str, timedelta] = {"24h": timedelta(hours=24), "30d": timedelta(days=30)}

_CENT = Decimal("0.01")
_SMALL = Decimal("0.0001")


def shown_usd(amount: Decimal) -> str:
    """``amount`` as a reader expects it: ``$1,234.57`` (cents, half-even, as invoices
    round), and four places below a cent so that small spend is not shown as $0.00 (below
    $0.0001: ``<$0.0001``)."""
    sign = "-" if amount < 0 else ""
    magnitude = abs(amount)
    if magnitude and magnitude < _CENT:
        places = magnitude.quantize(_SMALL, rounding=ROUND_HALF_EVEN)
        return f"{sign}${places}" if places else f"{sign}<${_SMALL}"
    return f"{sign}${magnitude.quantize(_CENT, rounding=ROUND_HALF_EVEN):,}"


def money(amount: Decimal) -> dict[str, str]:
    """Both spellings of an amount: ``exact`` (every digit) and ``shown`` (:func:`shown_usd`)."""
    return {"exact": fmt(amount), "shown": shown_usd(amount)}


@dataclass(frozen=True, slots=True)
class Point:
    start: datetime
    requests: int
    cost: Decimal

    def json(self) -> dict[str, Any]:
        return {"t": int(self.start.timestamp()), "requests": self.requests} | money(self.cost)


def bucket_start(instant: datetime, step: Step) -> datetime:
    """The UTC hour or day ``instant`` falls in."""
    instant = instant.astimezone(UTC)
    if step == "hour":
        return instant.replace(minute=0, second=0, microsecond=0)
    return instant.replace(hour=0, minute=0, second=0, microsecond=0)


def series_bounds(now: datetime, step: Step, window: Window) -> tuple[datetime, datetime]:
    """[first bucket's start, end of the current bucket): the window, in whole buckets,
    ending with the bucket ``now`` is in."""
    width = STEPS[step]
    last = bucket_start(now, step)
    count = max(1, round(WINDOWS[window] / width))
    return last - width * (count - 1), last + width


def series(
    rows: Mapping[datetime, tuple[int, Decimal]], now: datetime, step: Step, window: Window
) -> list[Point]:
    """One point per bucket of the window (zero where nothing was spent); ``rows`` maps a
    bucket's UTC start to its (requests, cost)."""
    width = STEPS[step]
    start, end = series_bounds(now, step, window)
    points = []
    at = start
    while at < end:
        requests, cost = rows.get(at, (0, Decimal(0)))
        points.append(Point(at, requests, cost))
        at += width
    return points


def day_rows(rows: Iterable[tuple[date, int, Decimal]]) -> dict[datetime, tuple[int, Decimal]]:
    """Summary rows by UTC day as :func:`series` takes them."""
    return {
        datetime(d.year, d.month, d.day, tzinfo=UTC): (requests, cost) for d, requests, cost in rows
    }


@dataclass(frozen=True, slots=True)
class Rate:
    """Requests and spend per minute over the current minute and the one before it."""

    requests_per_minute: Decimal
    cost_per_minute: Decimal

    def json(self) -> dict[str, Any]:
        return {
            "requests_per_minute": str(self.requests_per_minute),
            "cost_per_minute": money(self.cost_per_minute),
        }


def rate_window(now: datetime) -> datetime:
    """Where the "now" rate starts: the start of the minute before ``now``'s."""
    return now.astimezone(UTC).replace(second=0, microsecond=0) - timedelta(minutes=1)


def rate_now(requests: int, cost: Decimal, now: datetime) -> Rate:
    """Per-minute rates from what was counted since :func:`rate_window` (60-120 s ago, so a
    quiet second does not read as zero and a new minute's first seconds do not read as a
    spike)."""
    seconds = Decimal(str(max((now - rate_window(now)).total_seconds(), 1.0)))
    # an estimate shown to 6 places: the one division is the only rounding
    return Rate(
        (Decimal(requests * 60) / seconds).quantize(Decimal("0.1"), rounding=ROUND_HALF_EVEN),
        (product(cost, 60) / seconds).quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN),
    )


def share(used: Decimal, limit: Decimal | None) -> float | None:
    """How full a gauge is, 0.0-1.0 (a drawing, not money), or ``None`` without a limit."""
    if limit is None or limit <= 0:
        return None
    return float(min(max(used / limit, Decimal(0)), Decimal(1)))
