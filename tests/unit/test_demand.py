"""Seconds per model lately: summed with a fade of e^-(age / window)."""

from __future__ import annotations

import math

import pytest
from lego_coordinator.demand import RecentSeconds


def test_recent_seconds_are_a_rate_per_second_that_fades_with_time() -> None:
    demand = RecentSeconds(window_s=10.0)
    assert demand.rate("unet", 0.0) == 0.0
    for second in range(100):  # one second of work a second, for long: one device kept busy
        demand.add("unet", 1.0, float(second))
    expected = (1 - math.exp(-10.0)) / (1 - math.exp(-0.1))  # 100 terms, each faded e^-0.1 a second
    assert demand.total("unet", 99.0) == pytest.approx(expected, rel=1e-9)
    assert demand.rate("unet", 99.0) == pytest.approx(expected / 10, rel=1e-9)
    assert 0.95 < demand.rate("unet", 99.5) < 1.05
    assert demand.total("unet", 109.0) == pytest.approx(demand.total("unet", 99.0) / math.e)
    assert demand.rate("vae", 99.0) == 0.0  # per model
