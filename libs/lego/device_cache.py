"""The device-memory LRU cache of models (pure: decides, never loads). Used by workers and the simulator.

Before a model is loaded, least-recently-used idle models are evicted until its footprint fits the
budget; a model with work in flight (pinned) is never evicted.
"""

from __future__ import annotations

from collections import Counter, OrderedDict


class CacheFull(MemoryError):
    """The model cannot fit even after evicting every idle model."""


class DeviceCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._resident: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._pins: Counter[str] = Counter()

    @property
    def used_bytes(self) -> int:
        return sum(self._resident.values())

    def resident(self) -> list[str]:
        return list(self._resident)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._resident

    def plan_load(self, model_id: str, size: int) -> list[str]:
        """The models to evict, oldest first, so that `model_id` fits; raises CacheFull."""
        if model_id in self._resident:
            return []
        if size > self.budget_bytes:
            raise CacheFull(f"model {model_id} needs {size} bytes; the device budget is {self.budget_bytes}")
        free = self.budget_bytes - self.used_bytes
        victims: list[str] = []
        for candidate, footprint in self._resident.items():
            if free >= size:
                break
            if self._pins[candidate] == 0:
                victims.append(candidate)
                free += footprint
        if free < size:
            raise CacheFull(
                f"model {model_id} needs {size} bytes; at most {free} can be made free "
                f"(in use: {sorted(m for m in self._resident if self._pins[m])})"
            )
        return victims

    def admit(self, model_id: str, size: int) -> None:
        self._resident[model_id] = size
        self._resident.move_to_end(model_id)

    def evict(self, model_id: str) -> None:
        if self._pins[model_id]:
            raise RuntimeError(f"model {model_id} has work in flight and cannot be evicted")
        self._resident.pop(model_id, None)

    def touch(self, model_id: str) -> None:
        self._resident.move_to_end(model_id)

    def pin(self, model_id: str) -> None:
        self._pins[model_id] += 1

    def unpin(self, model_id: str) -> None:
        self._pins[model_id] -= 1
        if self._pins[model_id] <= 0:
            del self._pins[model_id]
