"""The torch backend: real diffusers/transformers models on the CPU or a CUDA device.

The host pool holds every prefetched model on the CPU; loading moves it to the device and
evicting moves it back (one copy of each model per worker, wherever it is).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lego.model_sources import SourcePolicy

from lego_worker import ops
from lego_worker.backend import Item, Outputs, PartSink, PatchSet
from lego_worker.lora import PatchState
from lego_worker.prompt_signatures import embedding_signature
from lego_worker.sources import SourceLoader, TextEncoderBundle


def _modules(model: Any) -> list[torch.nn.Module]:
    if isinstance(model, TextEncoderBundle):
        return [model.encoder]
    return [model] if isinstance(model, torch.nn.Module) else []


class TorchBackend:
    name = "torch"
    streams_parts = True  # ControlNets publish their block samples while they run (lego_worker.parts)
    streaming_calls = frozenset(ops.STREAMING_OPS)

    def __init__(
        self, device: str = "cpu", policy: SourcePolicy | None = None, lora_fetch_min_s: float = 0.0
    ) -> None:
        self.device = torch.device(device)
        # a LoRA fetch takes at least this long: a remote LoRA store's speed, on a fast local disk
        self.lora_fetch_min_s = lora_fetch_min_s
        self._loader = SourceLoader(policy)
        self._host: dict[str, Any] = {}
        self._patches = PatchState(policy)
        self.states = ops.SchedulerStates()

    def prefetch(self, model_id: str) -> float:
        if model_id in self._host:
            return 0.0
        started = time.perf_counter()
        self._host[model_id] = self._loader.load(model_id)
        return time.perf_counter() - started

    def host_model(self, model_id: str) -> Any:
        """The model in the host pool (prefetched first): for tools that measure it."""
        self.prefetch(model_id)
        return self._host[model_id]

    def workspace(self, model_id: str) -> int:
        return 0  # not measured here; `lego profile` measures it

    def footprint(self, model_id: str) -> int:
        self.prefetch(model_id)
        return sum(
            tensor.numel() * tensor.element_size()
            for module in _modules(self._host[model_id])
            for tensor in [*module.parameters(), *module.buffers()]
        )

    def _move(self, model_id: str, device: torch.device) -> None:
        for module in _modules(self._host[model_id]):
            module.to(device)

    def load(self, model_id: str) -> float:
        self.prefetch(model_id)
        started = time.perf_counter()
        self._move(model_id, self.device)
        return time.perf_counter() - started

    def unload(self, model_id: str) -> None:
        if model_id in self._host:
            self._move(model_id, torch.device("cpu"))

    def host_models(self) -> list[str]:
        return sorted(self._host)

    def fetch_lora(self, source: str) -> float:
        seconds = self._patches.fetch(source)
        if seconds < self.lora_fetch_min_s:
            time.sleep(self.lora_fetch_min_s - seconds)
            return self.lora_fetch_min_s
        return seconds

    def drop_lora(self, source: str) -> None:
        self._patches.drop(source)

    def signature(self, item: Item, output: Any) -> list[float]:
        return embedding_signature(output)

    def run(
        self,
        op: str,
        model_id: str,
        mode: str,
        items: list[Item],
        patches: PatchSet,
        parts: PartSink | None = None,
    ) -> list[Outputs]:
        model = self._host[model_id]
        key = (op, mode)
        if key in ops.STREAMING_OPS:
            if patches:
                raise ValueError(f"patches apply to denoisers only, not {op}")
            return ops.STREAMING_OPS[key](model, items, self.device, parts)
        if key in ops.BATCHED_OPS:
            if op in ("unet", "transformer"):  # LoRA patches a denoiser
                self._patches.apply(model, patches)
            elif patches:
                raise ValueError(f"patches apply to denoisers only, not {op}")
            return ops.BATCHED_OPS[key](model, items, self.device)
        if key in ops.STATEFUL_OPS:
            return [ops.STATEFUL_OPS[key](model, item, self.states) for item in items]
        raise ValueError(f"the torch backend cannot run {op}.{mode}")

    def release(self, request_id: str) -> None:
        self.states.release(request_id)
