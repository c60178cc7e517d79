"""The body pace rule of the shared middleware (the 408 cut itself runs over real sockets in
``tests/services/gateway/test_slow_clients.py``)."""

from __future__ import annotations

import pytest

from snap2caption.http import BodyPace


def test_a_body_gets_the_grace_period_plus_a_second_per_min_rate_bytes() -> None:
    pace = BodyPace(min_bytes_per_s=1000, grace_s=10, max_time_s=300)
    assert pace.deadline(started=100.0, received=0) == (110.0, "min_rate")
    assert pace.deadline(started=100.0, received=5000) == (115.0, "min_rate")
    # A byte every 2 s earns 2 ms each: such a trickle is cut soon after the grace period.
    assert pace.deadline(started=100.0, received=6)[0] == pytest.approx(110.006)


def test_the_total_time_caps_however_fast_the_body_came() -> None:
    pace = BodyPace(min_bytes_per_s=1000, grace_s=10, max_time_s=300)
    assert pace.deadline(started=100.0, received=10_000_000) == (400.0, "max_time")


@pytest.mark.parametrize(
    "values",
    [(0, 10, 300), (-1, 10, 300), (1000, -1, 300), (1000, 10, 0)],
    ids=["rate0", "rate<0", "grace<0", "max0"],
)
def test_nonsense_is_refused(values: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError):
        BodyPace(*values)
