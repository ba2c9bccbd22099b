"""What an execution backend provides to the executor (torch: real models; emulated: profiles)."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

Item = dict[str, Any]
Outputs = dict[str, np.ndarray]
PatchSet = tuple[tuple[str, float], ...]  # (LoRA source, scale), in application order


class PartSink(Protocol):
    """Where a call hands the parts of its streamed outputs while it runs (lego_worker.parts)."""

    def announce(self, item: int, output: str, total: int) -> None:
        """Item `item`'s output `output` will come as `total` parts (said before the first)."""
        ...

    def part(self, item: int, output: str, index: int, part: np.ndarray) -> None:
        """Part `index` of item `item`'s output `output`: its slice [:, index]."""
        ...


class Backend(Protocol):
    name: str
    # whether streamed outputs (operators' `streamed`) are handed to a part sink while a call runs,
    # and deferred inputs are consumed part by part as they arrive
    streams_parts: bool
    streaming_calls: frozenset[tuple[str, str]]  # (op, mode) of the calls that publish parts

    def prefetch(self, model_id: str) -> float:
        """Disk → host memory; returns seconds spent (0 when already there)."""
        ...

    def footprint(self, model_id: str) -> int:
        """Device bytes of the model's weights while it is resident."""
        ...

    def workspace(self, model_id: str) -> int:
        """Device bytes a call needs beyond the weights (peak activations; 0 when not known)."""
        ...

    def load(self, model_id: str) -> float:
        """Host → device; returns seconds spent."""
        ...

    def unload(self, model_id: str) -> None:
        """Device → host (the host copy stays in the pool)."""
        ...

    def host_models(self) -> list[str]: ...

    def fetch_lora(self, source: str) -> float:
        """A LoRA from its store into host memory, on a side thread while batches run; seconds spent."""
        ...

    def drop_lora(self, source: str) -> None:
        """Forget a fetched LoRA (its adapters leave the models); called between batches."""
        ...

    def signature(self, item: Item, output: Any) -> list[float]:
        """A unit-norm signature of a text encoder's output for `item` (approximate caching's key;
        lego_worker.prompt_signatures); [] when there is none."""
        ...

    def run(
        self,
        op: str,
        model_id: str,
        mode: str,
        items: list[Item],
        patches: PatchSet,
        parts: PartSink | None = None,
    ) -> list[Outputs]:
        """One batched call; `items[i]` maps input names to arrays/scalars (+ `state_key`)."""
        ...

    def release(self, request_id: str) -> None:
        """Drop per-request state (noise schedulers) of a finished request."""
        ...
