"""A model's recent demand: admitted work per second, fading with a time constant of the window."""

from __future__ import annotations

import math

import pytest
from lego_coordinator.demand import ModelDemand


def test_demand_is_the_work_admitted_per_second_and_fades_with_time() -> None:
    demand = ModelDemand(window_s=10.0)
    assert demand.rate("unet", 0.0) == 0.0
    for second in range(100):  # one second of work a second, for long: one device kept busy
        demand.add("unet", 1.0, float(second))
    expected = (1 - math.exp(-10.0)) / (1 - math.exp(-0.1)) / 10  # 100 terms, each faded e^-0.1 a second
    assert demand.rate("unet", 99.0) == pytest.approx(expected, rel=1e-9)
    assert 0.95 < demand.rate("unet", 99.5) < 1.05
    assert demand.rate("unet", 109.0) == pytest.approx(demand.rate("unet", 99.0) / math.e)
    assert demand.rate("vae", 99.0) == 0.0  # per model
