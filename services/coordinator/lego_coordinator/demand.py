"""Seconds per model lately: an exponentially decayed sum over about the last DEMAND_WINDOW_S.
Pure: the caller gives the time. The scheduler keeps two (lego_coordinator.scheduler
`_preload_hot_models`): each model's demand, the execution seconds of the work admitted for it, and
the seconds its ready work spent waiting for busy holders; either can scale the model out before a
backlog has built."""

from __future__ import annotations

import math

DEMAND_WINDOW_S = 10.0


class RecentSeconds:
    def __init__(self, window_s: float = DEMAND_WINDOW_S) -> None:
        self.window_s = window_s
        self._sums: dict[str, tuple[float, float]] = {}  # model → (decayed seconds, as of when)

    def add(self, model: str, seconds: float, now: float) -> None:
        self._sums[model] = (self.total(model, now) + seconds, now)

    def total(self, model: str, now: float) -> float:
        """The seconds added lately, each faded by e^-(its age / the window)."""
        total, at = self._sums.get(model, (0.0, now))
        return total * math.exp(-max(0.0, now - at) / self.window_s)

    def rate(self, model: str, now: float) -> float:
        """Seconds per second, lately: for admitted work, 1.0 keeps one device busy."""
        return self.total(model, now) / self.window_s
