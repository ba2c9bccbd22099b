"""Each model's recent demand: the execution seconds of the work admitted for it per second,
averaged over the last DEMAND_WINDOW_S or so (an exponentially decayed sum). Pure: the caller gives
the time. The scheduler scales a model out when its demand per replica nears a whole device, before
a backlog has built (lego_coordinator.scheduler `_preload_hot_models`)."""

from __future__ import annotations

import math

DEMAND_WINDOW_S = 10.0


class ModelDemand:
    def __init__(self, window_s: float = DEMAND_WINDOW_S) -> None:
        self.window_s = window_s
        self._sums: dict[str, tuple[float, float]] = {}  # model → (decayed seconds admitted, as of when)

    def add(self, model: str, seconds: float, now: float) -> None:
        self._sums[model] = (self._decayed(model, now) + seconds, now)

    def rate(self, model: str, now: float) -> float:
        """Seconds of the model's work admitted per second, lately: 1.0 keeps one device busy."""
        return self._decayed(model, now) / self.window_s

    def _decayed(self, model: str, now: float) -> float:
        total, at = self._sums.get(model, (0.0, now))
        return total * math.exp(-max(0.0, now - at) / self.window_s)
