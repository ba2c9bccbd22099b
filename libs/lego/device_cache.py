"""The device-memory LRU cache of models (pure: decides, never loads). Used by workers and the simulator.

A resident model costs its weights; the device also keeps room for one call's activations, the
largest workspace among the resident models (a device runs one batch at a time). Before a model is
loaded, least-recently-used idle models are evicted until its weights and that room fit the budget;
a model with work in flight (pinned) is never evicted.
"""

from __future__ import annotations

from collections import Counter, OrderedDict


class CacheFull(MemoryError):
    """The model cannot fit even after evicting every idle model."""


class DeviceCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._resident: OrderedDict[str, int] = OrderedDict()  # weights; least recently used first
        self._workspace: dict[str, int] = {}
        self._pins: Counter[str] = Counter()

    @property
    def used_bytes(self) -> int:
        """Resident weights plus the activation room reserved for them."""
        return self._needed(list(self._resident))

    def _needed(self, models: list[str], extra: tuple[int, int] = (0, 0)) -> int:
        weights = sum(self._resident[m] for m in models) + extra[0]
        return weights + max([extra[1], *(self._workspace.get(m, 0) for m in models)])

    def resident(self) -> list[str]:
        return list(self._resident)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._resident

    def plan_load(self, model_id: str, size: int, workspace: int = 0) -> list[str]:
        """The models to evict, oldest first, so that `model_id` (`size` bytes of weights, `workspace`
        bytes of activations while it runs) fits; raises CacheFull."""
        if model_id in self._resident:
            return []
        if size + workspace > self.budget_bytes:
            raise CacheFull(
                f"model {model_id} needs {size + workspace} bytes; the device budget is {self.budget_bytes}"
            )
        kept = list(self._resident)
        victims: list[str] = []
        for candidate in list(kept):
            if self._needed(kept, (size, workspace)) <= self.budget_bytes:
                break
            if self._pins[candidate] == 0:
                victims.append(candidate)
                kept.remove(candidate)
        if self._needed(kept, (size, workspace)) > self.budget_bytes:
            free = self.budget_bytes - self._needed(kept)
            raise CacheFull(
                f"model {model_id} needs {size + workspace} bytes; at most {free} can be made free "
                f"(in use: {sorted(m for m in self._resident if self._pins[m])})"
            )
        return victims

    def admit(self, model_id: str, size: int, workspace: int = 0) -> None:
        self._resident[model_id] = size
        self._workspace[model_id] = workspace
        self._resident.move_to_end(model_id)

    def evict(self, model_id: str) -> None:
        if self._pins[model_id]:
            raise RuntimeError(f"model {model_id} has work in flight and cannot be evicted")
        self._resident.pop(model_id, None)
        self._workspace.pop(model_id, None)

    def touch(self, model_id: str) -> None:
        self._resident.move_to_end(model_id)

    def pin(self, model_id: str) -> None:
        self._pins[model_id] += 1

    def unpin(self, model_id: str) -> None:
        self._pins[model_id] -= 1
        if self._pins[model_id] <= 0:
            del self._pins[model_id]
