"""The one retry pacing every waiting loop uses."""

from __future__ import annotations

import pytest

from services.core.backoff import Backoff


def test_delays_double_up_to_the_cap_and_reset() -> None:
    backoff = Backoff(0.5, 5.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    backoff.reset()
    assert backoff.next() == 0.5


@pytest.mark.parametrize(("initial", "cap"), [(0, 1), (-1, 1), (2, 1)])
def test_nonsense_bounds_are_refused(initial: float, cap: float) -> None:
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial, cap)
